/// The S3 XML documents as this client reads them, for callers outside the client (the fuzzer
/// feeds them arbitrary bytes; a damaged document must be refused with an error, never trap).
public enum S3Documents {
    /// One page of a ListObjectsV2 answer.
    public struct Listing: Sendable, Equatable {
        public var objects: [S3Object]
        public var commonPrefixes: [String]
        public var isTruncated: Bool
        public var nextContinuationToken: String?
    }

    /// Why a document was refused: what is wrong, at which byte.
    public struct Damage: Error, Sendable, CustomStringConvertible {
        public var offset: Int
        public var why: String
        public var description: String { "\(why) at byte \(offset)" }
    }

    /// Reads a ListBucketResult document.
    public static func listing(_ bytes: [UInt8]) throws(Damage) -> Listing {
        do {
            let p = try ListPage.parse(bytes)
            return Listing(objects: p.objects, commonPrefixes: p.commonPrefixes, isTruncated: p.isTruncated,
                           nextContinuationToken: p.nextContinuationToken)
        } catch {
            throw Damage(offset: error.offset, why: error.why)
        }
    }

    /// S3's <Error> document's code and message, nil when `bytes` is not one.
    public static func error(_ bytes: [UInt8]) -> (code: String, message: String)? {
        S3ErrorDocument.parse(bytes).map { ($0.code, $0.message) }
    }
}
