package org.pocketembed;

/**
 * Prints, for each error code given, the class the Java client raises it as: "CODE\tClass" per line
 * (tests/test_java.py compares them with the protocol's registry). In the client's package: of() is not public.
 */
public final class CodeClasses {
    public static void main(String[] args) {
        for (String code : args) {
            System.out.println(code + "\t" + DaemonException.of(code, "m", null).getClass().getSimpleName());
        }
    }
}
