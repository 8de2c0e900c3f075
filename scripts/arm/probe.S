// A guest program whose instruction count is known, for checking scripts/arm/insn_count.c:
// between its two marks (lseek(-1, MARK | phase, 0), see insn_count.c) it runs a 3-instruction
// loop 1000 x argc times, so two runs with different argument counts differ by exactly
// 3000 instructions per extra argument, and two runs with the same arguments not at all.
    .global _start
    .text
_start:
    ldr     x19, [sp]               // argc
    mov     x20, #1000
    mul     x19, x19, x20           // iterations
    mov     x0, #-1                 // mark 1
    movz    x1, #0x7065, lsl #48
    movk    x1, #0x6d6b, lsl #32
    orr     x1, x1, #1
    mov     x2, #0
    mov     x8, #62                 // lseek
    svc     #0
    mov     x21, #0
1:  add     x21, x21, #1
    subs    x19, x19, #1
    b.ne    1b
    mov     x0, #-1                 // mark 2
    movz    x1, #0x7065, lsl #48
    movk    x1, #0x6d6b, lsl #32
    orr     x1, x1, #2
    mov     x2, #0
    mov     x8, #62
    svc     #0
    mov     x0, #0
    mov     x8, #94                 // exit_group
    svc     #0
