// The test tags and the seeded generator are one set for every test target (Tests/TestSupport);
// importing it here makes them visible in every file of this target.
@_exported import TestSupport
