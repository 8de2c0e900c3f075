/*
 * Guest instructions executed, counted exactly, for scripts/bench_arm.py.
 *
 * A qemu TCG plugin (plugin API version 1, qemu 7.2's include/qemu/qemu-plugin.h).
 * Every translation block gets one execution callback carrying its instruction count;
 * the callback adds it to a counter of the executing vCPU's own. In qemu-user every
 * guest thread is a vCPU of its own, running in parallel with the others, so a shared
 * counter (what qemu's inline "add" ops update, unlocked) loses increments when two
 * threads run the same code at once; one counter per vCPU index, written only by the
 * thread holding that index, loses none.
 *
 * The guest marks the phases it wants measured with a system call that does nothing:
 * lseek(-1, MARK_MAGIC | phase, 0), which fails with EBADF. At each mark the plugin
 * writes the total so far ("mark PHASE TOTAL"), and with tb=on the per-block counts so
 * far ("tb PHASE N" then N lines "VADDR INSNS"), which bench_arm.py differences between
 * marks and maps onto the guest's shared objects and their symbols. At exit: "end TOTAL"
 * (and "tb end N" with the blocks).
 *
 * Arguments: out=FILE (default: stderr through qemu_plugin_outs), tb=on|off (default off).
 */
#include <glib.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MARK_MAGIC 0x70656d6b00000000ULL /* "pemk" in the high half of lseek's offset */
#define NR_LSEEK_AARCH64 62
#define SLOTS 8          /* vCPU indices with a plain counter per block; higher ones add atomically */
#define MAX_VCPUS 1024   /* vCPU indices with a plain total; qemu-user reuses the lowest free index */

/* One translation block: where it starts, its length, how often each vCPU slot ran it. */
typedef struct {
    uint64_t vaddr;
    uint64_t n_insns;
    uint64_t execs[SLOTS];
    uint64_t execs_shared; /* vCPU indices >= SLOTS, atomically */
} TbRecord;

/* A total per vCPU index, each on a cache line of its own (no false sharing between threads). */
typedef struct {
    uint64_t insns;
    char pad[56];
} Total;

static Total totals[MAX_VCPUS];
static uint64_t totals_shared; /* indices >= MAX_VCPUS, atomically */
static bool per_tb;
static FILE *out;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER; /* the record list and the output */
static TbRecord **records;
static size_t n_records, cap_records;

static void exec_total(unsigned int vcpu, void *udata)
{
    uint64_t n = (uint64_t)(uintptr_t)udata;
    if (vcpu < MAX_VCPUS) {
        totals[vcpu].insns += n;
    } else {
        __atomic_fetch_add(&totals_shared, n, __ATOMIC_RELAXED);
    }
}

static void exec_tb(unsigned int vcpu, void *udata)
{
    TbRecord *r = udata;
    if (vcpu < SLOTS) {
        r->execs[vcpu]++;
    } else {
        __atomic_fetch_add(&r->execs_shared, 1, __ATOMIC_RELAXED);
    }
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t n = qemu_plugin_tb_n_insns(tb);
    if (!per_tb) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, exec_total, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)n);
        return;
    }
    TbRecord *r = g_new0(TbRecord, 1);
    r->vaddr = qemu_plugin_tb_vaddr(tb);
    r->n_insns = n;
    pthread_mutex_lock(&lock);
    if (n_records == cap_records) {
        cap_records = cap_records ? cap_records * 2 : 65536;
        records = g_renew(TbRecord *, records, cap_records);
    }
    records[n_records++] = r;
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, exec_tb, QEMU_PLUGIN_CB_NO_REGS, r);
}

static uint64_t record_insns(const TbRecord *r)
{
    uint64_t e = __atomic_load_n(&r->execs_shared, __ATOMIC_RELAXED);
    for (int i = 0; i < SLOTS; i++) {
        e += __atomic_load_n(&r->execs[i], __ATOMIC_RELAXED);
    }
    return e * r->n_insns;
}

/* All instructions so far, over every vCPU (other threads' counters read as they stand). */
static uint64_t total_so_far(void)
{
    uint64_t t = 0;
    if (per_tb) {
        for (size_t i = 0; i < n_records; i++) {
            t += record_insns(records[i]);
        }
        return t;
    }
    t = __atomic_load_n(&totals_shared, __ATOMIC_RELAXED);
    for (int i = 0; i < MAX_VCPUS; i++) {
        t += __atomic_load_n(&totals[i].insns, __ATOMIC_RELAXED);
    }
    return t;
}

/* "mark PHASE TOTAL" (or "end TOTAL" at exit), then with tb=on "tb PHASE|end N" and N blocks. */
static void report(const char *phase)
{
    pthread_mutex_lock(&lock);
    uint64_t total = total_so_far();
    const char *what = strcmp(phase, "end") ? "mark " : "";
    if (out) {
        fprintf(out, "%s%s %" PRIu64 "\n", what, phase, total);
        if (per_tb) {
            size_t live = 0;
            for (size_t i = 0; i < n_records; i++) {
                live += record_insns(records[i]) != 0;
            }
            fprintf(out, "tb %s %zu\n", phase, live);
            for (size_t i = 0; i < n_records; i++) {
                uint64_t c = record_insns(records[i]);
                if (c) {
                    fprintf(out, "%" PRIx64 " %" PRIu64 "\n", records[i]->vaddr, c);
                }
            }
        }
        fflush(out);
    } else {
        g_autofree gchar *line = g_strdup_printf("%s%s %" PRIu64 "\n", what, phase, total);
        qemu_plugin_outs(line);
    }
    pthread_mutex_unlock(&lock);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num == NR_LSEEK_AARCH64 && a1 == UINT64_MAX && (a2 & 0xffffffff00000000ULL) == MARK_MAGIC) {
        char phase[24];
        snprintf(phase, sizeof phase, "%" PRIu64, (uint64_t)(a2 & 0xffffffffULL));
        report(phase);
    }
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    report("end");
    if (out && out != stderr) {
        fclose(out);
        out = NULL;
    }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        g_auto(GStrv) kv = g_strsplit(argv[i], "=", 2);
        if (kv[0] && kv[1] && g_strcmp0(kv[0], "out") == 0) {
            path = argv[i] + strlen("out=");
        } else if (kv[0] && kv[1] && g_strcmp0(kv[0], "tb") == 0) {
            if (!qemu_plugin_bool_parse(kv[0], kv[1], &per_tb)) {
                fprintf(stderr, "insn_count: tb=%s is not a boolean\n", kv[1]);
                return -1;
            }
        } else {
            fprintf(stderr, "insn_count: unknown argument %s (out=FILE, tb=on|off)\n", argv[i]);
            return -1;
        }
    }
    if (path) {
        out = fopen(path, "w");
        if (!out) {
            perror(path);
            return -1;
        }
        fprintf(out, "# insn_count target=%s tb=%s\n", info->target_name, per_tb ? "on" : "off");
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
