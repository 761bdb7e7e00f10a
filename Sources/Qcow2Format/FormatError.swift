/// A violation of the qcow2 format found while parsing bytes.
///
/// Parsing throws from initialisers, so an invalid header or table entry cannot exist as a value.
/// The message names the field, its byte offset in the image, and the value that was read.
public struct FormatError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The spec's name of the field that is wrong (`cluster_bits`, `l1_table_offset`, …).
    public var field: String
    /// Byte offset of the field in the image (or in the table being parsed).
    public var offset: UInt64
    /// The value that was found, when it is a number.
    public var value: UInt64?
    /// What is wrong, in a few words.
    public var reason: String

    public init(field: String, offset: UInt64, value: UInt64? = nil, reason: String) {
        self.field = field
        self.offset = offset
        self.value = value
        self.reason = reason
    }

    public var description: String {
        if let value {
            return "\(field) at offset \(offset) is \(value): \(reason)"
        }
        return "\(field) at offset \(offset): \(reason)"
    }
}
