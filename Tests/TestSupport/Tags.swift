import Testing

/// The subsets a test belongs to (#27's list), so a run or a report can pick one.
extension Tag {
    /// Quick, no external tools.
    @Tag public static var fast: Self
    /// Runs the real binary end to end.
    @Tag public static var e2e: Self
    /// Speaks NBD.
    @Tag public static var nbd: Self
    /// Reads a PBS datastore or server.
    @Tag public static var pbs: Self
    /// Forces failures (syscall faults, damaged input, silent peers).
    @Tag public static var faults: Self
    /// Property tests over generated cases.
    @Tag public static var property: Self
}
