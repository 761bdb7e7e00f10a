/// A small XML reader for OVF descriptors: elements, attributes, text, comments, processing
/// instructions, CDATA and the predefined and numeric character references. Namespaces are not
/// resolved: elements and attributes are matched by their local name (`ovf:href` is `href`), which
/// is how every OVF writer's prefixes can be read alike. A DOCTYPE (entity definitions) is refused,
/// as are unbalanced tags and more nesting or elements than a descriptor has.
struct XMLElement: Sendable {
    var name: String
    var attributes: [(name: String, value: String)] = []
    var children: [XMLElement] = []
    var text = ""

    /// The local part of a qualified name.
    static func local(_ q: String) -> Substring {
        guard let c = q.lastIndex(of: ":") else { return q[...] }
        return q[q.index(after: c)...]
    }

    /// The attribute whose local name is `local` (the first such).
    func attribute(_ local: String) -> String? {
        attributes.first { Self.local($0.name) == local && !$0.name.hasPrefix("xmlns") }?.value
    }
    /// Children whose local name is `local`.
    func children(_ local: String) -> [XMLElement] { children.filter { Self.local($0.name) == local } }
    func child(_ local: String) -> XMLElement? { children.first { Self.local($0.name) == local } }
    /// Every descendant (depth first) whose local name is `local`.
    func descendants(_ local: String) -> [XMLElement] {
        var out: [XMLElement] = []
        for c in children {
            if Self.local(c.name) == local { out.append(c) }
            out += c.descendants(local)
        }
        return out
    }
    /// The trimmed text of the child `local`.
    func value(_ local: String) -> String? {
        child(local).map { $0.text.trimmingWhitespace }
    }
}

extension String {
    var trimmingWhitespace: String {
        let ws: Set<Character> = [" ", "\t", "\n", "\r"]
        guard let a = firstIndex(where: { !ws.contains($0) }), let b = lastIndex(where: { !ws.contains($0) }) else { return "" }
        return String(self[a...b])
    }
}

struct XMLLite {
    /// Deeper than this is refused (an OVF nests about 6 levels).
    static let maxDepth = 64
    /// More elements than this are refused (a 100-disk OVF has a few thousand).
    static let maxElements = 200_000

    private let b: [UInt8]
    private let name: String
    private var p = 0
    private var elements = 0

    /// Parses `bytes` (UTF-8) into its root element; errors name `name` and the byte offset.
    static func parse(_ bytes: [UInt8], name: String) throws(QcowPressError) -> XMLElement {
        var x = XMLLite(b: bytes, name: name)
        return try x.document()
    }

    private init(b: [UInt8], name: String) {
        self.b = b
        self.name = name
    }

    private func bad(_ why: String, at: Int? = nil) -> QcowPressError {
        .inputDamaged(path: name, location: "XML at byte \(at ?? p): \(why)")
    }

    private func starts(_ s: String) -> Bool {
        let u = s.utf8
        guard b.count - p >= u.count else { return false }
        var i = p
        for c in u {
            if b[i] != c { return false }
            i += 1
        }
        return true
    }

    private mutating func skip(past end: String, what: String) throws(QcowPressError) {
        let at = p
        while p < b.count && !starts(end) { p += 1 }
        guard p < b.count else { throw bad("\(what) is not closed", at: at) }
        p += end.utf8.count
    }

    private static func isSpace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D }
    private mutating func spaces() { while p < b.count && Self.isSpace(b[p]) { p += 1 } }

    /// Comments, processing instructions and blanks between markup.
    private mutating func misc() throws(QcowPressError) {
        while true {
            spaces()
            if starts("<?") { try skip(past: "?>", what: "processing instruction") }
            else if starts("<!--") { try skip(past: "-->", what: "comment") }
            else if starts("<!DOCTYPE") || starts("<!ENTITY") { throw bad("a DOCTYPE is refused in an OVF descriptor (entity definitions)") }
            else { return }
        }
    }

    private mutating func document() throws(QcowPressError) -> XMLElement {
        // A UTF-8 byte order mark is allowed.
        if starts("\u{FEFF}") { p += 3 }
        try misc()
        guard p < b.count, b[p] == UInt8(ascii: "<") else { throw bad("no root element") }
        let root = try element(depth: 0)
        try misc()
        guard p == b.count || b[p...].allSatisfy({ $0 == 0 }) else { throw bad("content after the root element") }
        return root
    }

    private mutating func qname() throws(QcowPressError) -> String {
        let at = p
        while p < b.count, !Self.isSpace(b[p]), !"/>=<\"'".utf8.contains(b[p]) { p += 1 }
        guard p > at else { throw bad("a name is expected") }
        return String(decoding: b[at..<p], as: UTF8.self)
    }

    private mutating func element(depth: Int) throws(QcowPressError) -> XMLElement {
        guard depth < Self.maxDepth else { throw bad("elements nest deeper than \(Self.maxDepth)") }
        elements += 1
        guard elements <= Self.maxElements else { throw bad("more than \(Self.maxElements) elements") }
        p += 1  // "<"
        var e = XMLElement(name: try qname())
        while true {
            spaces()
            guard p < b.count else { throw bad("tag <\(e.name)> is not closed") }
            if starts("/>") {
                p += 2
                return e
            }
            if b[p] == UInt8(ascii: ">") {
                p += 1
                break
            }
            let n = try qname()
            spaces()
            guard p < b.count, b[p] == UInt8(ascii: "=") else { throw bad("attribute \(n) of <\(e.name)> has no value") }
            p += 1
            spaces()
            guard p < b.count, b[p] == UInt8(ascii: "\"") || b[p] == UInt8(ascii: "'") else { throw bad("attribute \(n) of <\(e.name)> is not quoted") }
            let q = b[p]
            p += 1
            let at = p
            while p < b.count && b[p] != q && b[p] != UInt8(ascii: "<") { p += 1 }
            guard p < b.count, b[p] == q else { throw bad("attribute \(n) of <\(e.name)> is not closed", at: at) }
            let v = try decode(at..<p)
            p += 1
            guard !e.attributes.contains(where: { $0.name == n }) else { throw bad("attribute \(n) appears twice in <\(e.name)>") }
            e.attributes.append((n, v))
        }
        // Content.
        while true {
            guard p < b.count else { throw bad("<\(e.name)> is not closed") }
            if starts("</") {
                p += 2
                let n = try qname()
                guard n == e.name else { throw bad("</\(n)> closes <\(e.name)>") }
                spaces()
                guard p < b.count, b[p] == UInt8(ascii: ">") else { throw bad("</\(n) is not closed") }
                p += 1
                return e
            }
            if starts("<!--") { try skip(past: "-->", what: "comment"); continue }
            if starts("<?") { try skip(past: "?>", what: "processing instruction"); continue }
            if starts("<![CDATA[") {
                p += 9
                let at = p
                try skip(past: "]]>", what: "CDATA section")
                e.text += String(decoding: b[at..<(p - 3)], as: UTF8.self)
                continue
            }
            if starts("<!") { throw bad("markup declaration inside <\(e.name)>") }
            if b[p] == UInt8(ascii: "<") {
                e.children.append(try element(depth: depth + 1))
                continue
            }
            let at = p
            while p < b.count && b[p] != UInt8(ascii: "<") { p += 1 }
            e.text += try decode(at..<p)
        }
    }

    /// Text with its character references replaced.
    private func decode(_ r: Range<Int>) throws(QcowPressError) -> String {
        guard b[r].contains(UInt8(ascii: "&")) else { return String(decoding: b[r], as: UTF8.self) }
        var out: [UInt8] = []
        var i = r.lowerBound
        while i < r.upperBound {
            guard b[i] == UInt8(ascii: "&") else {
                out.append(b[i])
                i += 1
                continue
            }
            guard let semi = b[i..<min(r.upperBound, i + 12)].firstIndex(of: UInt8(ascii: ";")) else { throw bad("'&' does not start a reference", at: i) }
            let ref = String(decoding: b[(i + 1)..<semi], as: UTF8.self)
            let named: [String: String] = ["lt": "<", "gt": ">", "amp": "&", "quot": "\"", "apos": "'"]
            if let s = named[ref] {
                out += Array(s.utf8)
            } else if ref.hasPrefix("#"), let v = ref.hasPrefix("#x") ? UInt32(ref.dropFirst(2), radix: 16) : UInt32(ref.dropFirst()),
                      let u = Unicode.Scalar(v) {
                out += Array(String(Character(u)).utf8)
            } else {
                throw bad("unknown reference &\(ref);", at: i)
            }
            i = semi + 1
        }
        return String(decoding: out, as: UTF8.self)
    }
}
