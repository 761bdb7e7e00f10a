// The test tags are one set for every test target (Tests/TestTags); importing it here makes them
// visible in every file of this target.
@_exported import TestTags
