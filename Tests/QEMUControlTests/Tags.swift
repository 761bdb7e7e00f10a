import Testing

/// The subsets a test belongs to (#27's list), so a run or a report can pick one.
extension Tag {
    @Tag static var fast: Self
    @Tag static var e2e: Self
    @Tag static var nbd: Self
    @Tag static var pbs: Self
    @Tag static var faults: Self
    @Tag static var property: Self
}
