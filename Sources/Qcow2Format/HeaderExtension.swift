/// A header extension: u32 type, u32 length, data padded to a multiple of 8. Type 0 ends the list.
public enum HeaderExtension: Sendable, Equatable {
    /// 0xE2792ACA: the backing file's format name ("qcow2", "raw").
    case backingFormat(String)
    /// 0x6803F857: names of feature bits, 48 bytes each.
    case featureNames([FeatureName])
    /// 0x44415441: external data file name.
    case externalDataFile(String)
    /// 0x23852875: bitmaps directory (kept as raw bytes; QcowPress never writes bitmaps).
    case bitmaps([UInt8])
    /// Anything else; readers skip it.
    case unknown(type: UInt32, data: [UInt8])

    public static let endType: UInt32 = 0
    public static let backingFormatType: UInt32 = 0xE279_2ACA
    public static let featureNamesType: UInt32 = 0x6803_F857
    public static let externalDataFileType: UInt32 = 0x4441_5441
    public static let bitmapsType: UInt32 = 0x2385_2875

    public var type: UInt32 {
        switch self {
        case .backingFormat: Self.backingFormatType
        case .featureNames: Self.featureNamesType
        case .externalDataFile: Self.externalDataFileType
        case .bitmaps: Self.bitmapsType
        case .unknown(let type, _): type
        }
    }

    /// The extension's payload, without type, length or padding.
    public var payload: [UInt8] {
        switch self {
        case .backingFormat(let s), .externalDataFile(let s):
            return Array(s.utf8)
        case .featureNames(let names):
            var out: [UInt8] = []
            for n in names {
                out.append(n.kind.rawValue)
                out.append(n.bit)
                var name = Array(n.name.utf8.prefix(46))
                name.append(contentsOf: repeatElement(0, count: 46 - name.count))
                out.append(contentsOf: name)
            }
            return out
        case .bitmaps(let d), .unknown(_, let d):
            return d
        }
    }

    /// Decodes one extension from its type and payload. `offset` is where the payload starts in the image.
    public init(type: UInt32, payload: [UInt8], offset: UInt64) throws(FormatError) {
        func string() throws(FormatError) -> String {
            guard let s = String(validating: payload, as: UTF8.self) else {
                throw FormatError(field: "header extension 0x\(String(type, radix: 16))", offset: offset, reason: "name is not UTF-8")
            }
            return s
        }
        switch type {
        case Self.backingFormatType:
            self = .backingFormat(try string())
        case Self.externalDataFileType:
            self = .externalDataFile(try string())
        case Self.featureNamesType:
            guard payload.count % 48 == 0 else {
                throw FormatError(field: "feature name table length", offset: offset - 4, value: UInt64(payload.count), reason: "not a multiple of 48")
            }
            var names: [FeatureName] = []
            for i in stride(from: 0, to: payload.count, by: 48) {
                let nameBytes = payload[(i + 2)..<(i + 48)].prefix { $0 != 0 }
                let kind = FeatureName.Kind(rawValue: payload[i]) ?? .incompatible
                names.append(FeatureName(kind: kind, bit: payload[i + 1], name: String(decoding: nameBytes, as: UTF8.self)))
            }
            self = .featureNames(names)
        case Self.bitmapsType:
            self = .bitmaps(payload)
        default:
            self = .unknown(type: type, data: payload)
        }
    }
}
