import Synchronization

/// A value shared with closures that run on other threads.
final class Shared<Value: Sendable>: Sendable {
    let value: Mutex<Value>
    init(_ v: Value) { value = Mutex(v) }
    var current: Value { value.withLock { $0 } }
}
