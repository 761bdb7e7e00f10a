/// A small XML reader for the documents S3 sends (ListBucketResult, Error): elements, text,
/// attributes skipped, the five named entities and numeric character references decoded,
/// comments, processing instructions, DOCTYPE and CDATA handled. Not a validating parser: it only
/// needs to read well-formed answers and refuse the rest without crashing.
struct XMLElement: Sendable, Equatable {
    var name: String
    var children: [XMLElement] = []
    var text: String = ""

    /// The first child named `name`.
    func child(_ name: String) -> XMLElement? { children.first { $0.name == name } }
    func all(_ name: String) -> [XMLElement] { children.filter { $0.name == name } }
    /// The text of the first child named `name`.
    subscript(_ name: String) -> String? { child(name)?.text }
}

struct XMLError: Error, Equatable {
    var offset: Int
    var why: String
}

enum S3XML {
    /// The root element of `bytes`. Nesting deeper than `maxDepth` is refused (S3's documents are
    /// 3 levels deep; the bound keeps a hostile document from exhausting the stack).
    static func parse(_ bytes: [UInt8], maxDepth: Int = 32) throws(XMLError) -> XMLElement {
        var p = Parser(b: bytes)
        p.skipProlog()
        guard p.i < p.b.count, p.b[p.i] == UInt8(ascii: "<") else { throw XMLError(offset: p.i, why: "no root element") }
        let root = try p.element(depth: 0, maxDepth: maxDepth)
        return root
    }

    /// Decodes &amp; &lt; &gt; &quot; &apos; &#NN; &#xHH; in `s`.
    static func decodeEntities(_ s: ArraySlice<UInt8>, at offset: Int) throws(XMLError) -> String {
        guard s.contains(UInt8(ascii: "&")) else { return String(decoding: s, as: UTF8.self) }
        var out: [UInt8] = []
        out.reserveCapacity(s.count)
        var i = s.startIndex
        while i < s.endIndex {
            let c = s[i]
            guard c == UInt8(ascii: "&") else { out.append(c); i += 1; continue }
            guard let semi = s[i...].prefix(12).firstIndex(of: UInt8(ascii: ";")) else {
                throw XMLError(offset: offset + i - s.startIndex, why: "an '&' without ';'")
            }
            let name = String(decoding: s[(i + 1)..<semi], as: UTF8.self)
            switch name {
            case "amp": out.append(UInt8(ascii: "&"))
            case "lt": out.append(UInt8(ascii: "<"))
            case "gt": out.append(UInt8(ascii: ">"))
            case "quot": out.append(UInt8(ascii: "\""))
            case "apos": out.append(UInt8(ascii: "'"))
            default:
                var v: UInt32? = nil
                if name.hasPrefix("#x") || name.hasPrefix("#X") {
                    v = UInt32(name.dropFirst(2), radix: 16)
                } else if name.hasPrefix("#") {
                    v = UInt32(name.dropFirst(), radix: 10)
                }
                guard let v, let scalar = Unicode.Scalar(v) else {
                    throw XMLError(offset: offset + i - s.startIndex, why: "an unknown entity '&\(name);'")
                }
                out.append(contentsOf: Array(String(Character(scalar)).utf8))
            }
            i = semi + 1
        }
        return String(decoding: out, as: UTF8.self)
    }
}

private struct Parser {
    let b: [UInt8]
    var i = 0

    init(b: [UInt8]) { self.b = b }

    func at(_ s: String) -> Bool {
        let u = Array(s.utf8)
        return i + u.count <= b.count && Array(b[i..<(i + u.count)]) == u
    }

    mutating func skipSpace() {
        while i < b.count, b[i] == 0x20 || b[i] == 0x09 || b[i] == 0x0A || b[i] == 0x0D { i += 1 }
    }

    /// Moves past the next `end`, or to the end of the input.
    mutating func skipPast(_ end: String) {
        let u = Array(end.utf8)
        while i < b.count {
            if b[i] == u[0], at(end) { i += u.count; return }
            i += 1
        }
    }

    /// BOM, <?xml …?>, comments, <!DOCTYPE …> and space before the root.
    mutating func skipProlog() {
        if at("\u{FEFF}") { i += 3 }
        while true {
            skipSpace()
            if at("<?") { skipPast("?>") } else if at("<!--") { skipPast("-->") } else if at("<!") { skipPast(">") } else { return }
        }
    }

    mutating func name() throws(XMLError) -> String {
        let start = i
        while i < b.count {
            let c = b[i]
            if c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D || c == UInt8(ascii: ">") || c == UInt8(ascii: "/") { break }
            i += 1
        }
        guard i > start else { throw XMLError(offset: start, why: "an element without a name") }
        return String(decoding: b[start..<i], as: UTF8.self)
    }

    /// Parses `<name …>content</name>` or `<name …/>` starting at '<'.
    mutating func element(depth: Int, maxDepth: Int) throws(XMLError) -> XMLElement {
        guard depth < maxDepth else { throw XMLError(offset: i, why: "elements nested deeper than \(maxDepth)") }
        i += 1
        var e = XMLElement(name: try name())
        // Attributes: skipped, quoted values may hold '>' or '/'.
        while true {
            guard i < b.count else { throw XMLError(offset: i, why: "the document ends inside <\(e.name)>") }
            let c = b[i]
            if c == UInt8(ascii: "\"") || c == UInt8(ascii: "'") {
                i += 1
                while i < b.count, b[i] != c { i += 1 }
                i += 1
            } else if c == UInt8(ascii: "/") {
                guard i + 1 < b.count, b[i + 1] == UInt8(ascii: ">") else { throw XMLError(offset: i, why: "a stray '/' in <\(e.name)>") }
                i += 2
                return e
            } else if c == UInt8(ascii: ">") {
                i += 1
                break
            } else {
                i += 1
            }
        }
        var text: [UInt8] = []
        while true {
            guard i < b.count else { throw XMLError(offset: i, why: "the document ends inside <\(e.name)>") }
            if b[i] != UInt8(ascii: "<") {
                let start = i
                while i < b.count, b[i] != UInt8(ascii: "<") { i += 1 }
                text.append(contentsOf: Array(try S3XML.decodeEntities(b[start..<i], at: start).utf8))
            } else if at("<![CDATA[") {
                i += 9
                let start = i
                skipPast("]]>")
                text.append(contentsOf: b[start..<max(start, i - 3)])
            } else if at("<!--") {
                skipPast("-->")
            } else if at("<?") {
                skipPast("?>")
            } else if at("</") {
                i += 2
                let closing = try name()
                guard closing == e.name else {
                    throw XMLError(offset: i, why: "</\(closing)> closes <\(e.name)>")
                }
                skipSpace()
                guard i < b.count, b[i] == UInt8(ascii: ">") else { throw XMLError(offset: i, why: "an unclosed </\(closing)") }
                i += 1
                e.text = e.children.isEmpty ? String(decoding: text, as: UTF8.self) : ""
                return e
            } else {
                e.children.append(try element(depth: depth + 1, maxDepth: maxDepth))
            }
        }
    }
}

/// One page of ListObjectsV2.
struct ListPage: Sendable, Equatable {
    var objects: [S3Object]
    var commonPrefixes: [String]
    var isTruncated: Bool
    var nextContinuationToken: String?

    /// Reads a ListBucketResult document.
    static func parse(_ bytes: [UInt8]) throws(XMLError) -> ListPage {
        let root = try S3XML.parse(bytes)
        guard root.name == "ListBucketResult" else {
            throw XMLError(offset: 0, why: "the root element is <\(root.name)>, not <ListBucketResult>")
        }
        var objects: [S3Object] = []
        for c in root.all("Contents") {
            guard let key = c["Key"] else { throw XMLError(offset: 0, why: "a <Contents> without <Key>") }
            guard let sizeText = c["Size"], let size = UInt64(sizeText.trimmingWhitespace()) else {
                throw XMLError(offset: 0, why: "the <Contents> of '\(key)' has no valid <Size>")
            }
            objects.append(S3Object(key: key, size: size))
        }
        let prefixes = root.all("CommonPrefixes").compactMap { $0["Prefix"] }
        let truncated = root["IsTruncated"]?.trimmingWhitespace() == "true"
        let token = root["NextContinuationToken"].flatMap { $0.isEmpty ? nil : $0 }
        if truncated, token == nil {
            throw XMLError(offset: 0, why: "a truncated listing without <NextContinuationToken>")
        }
        return ListPage(objects: objects, commonPrefixes: prefixes, isTruncated: truncated, nextContinuationToken: token)
    }
}

/// S3's <Error> document: Code and Message.
struct S3ErrorDocument: Sendable, Equatable {
    var code: String
    var message: String

    /// nil when `bytes` is not an <Error> document (an HTML page from a proxy, an empty body).
    static func parse(_ bytes: [UInt8]) -> S3ErrorDocument? {
        guard let root = try? S3XML.parse(bytes), root.name == "Error", let code = root["Code"], !code.isEmpty else {
            return nil
        }
        return S3ErrorDocument(code: code, message: root["Message"] ?? "")
    }
}
