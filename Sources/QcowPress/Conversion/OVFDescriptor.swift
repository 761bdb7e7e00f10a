/// What QcowPress takes from an OVF descriptor (DMTF DSP0243, versions 1 and 2, as VMware, VirtualBox
/// and others write it): the files (`References/File`), the disks (`DiskSection/Disk`), and of the
/// first `VirtualSystem` its name, CPUs, memory and network adapters. Everything else is ignored.
public struct OVFDescriptor: Sendable, Equatable {
    public struct File: Sendable, Equatable {
        public var id: String
        public var href: String
        public var size: UInt64?
        /// `ovf:compression="gzip"`: the file is stored gzip-compressed.
        public var gzip: Bool
    }
    public struct Disk: Sendable, Equatable {
        public var id: String
        /// The `File` id; nil for a blank disk (capacity only).
        public var fileRef: String?
        /// Bytes (capacity × capacityAllocationUnits).
        public var capacity: UInt64
        public var format: String?
    }
    public struct NIC: Sendable, Equatable, Codable {
        public var name: String?
        /// ResourceSubType: E1000, VmxNet3, PCNet32, virtio, …
        public var type: String?
        /// The network it is connected to (Connection).
        public var connection: String?
        public var mac: String?
    }

    public var files: [File] = []
    public var disks: [Disk] = []
    public var name: String?
    public var cpus: Int?
    public var memoryMiB: UInt64?
    public var nics: [NIC] = []

    /// Parses an OVF descriptor; `path` names the errors (one line each, naming the element).
    public init(xml: [UInt8], path: String) throws(QcowPressError) {
        let root = try XMLLite.parse(xml, name: path)
        func bad(_ why: String) -> QcowPressError { .inputDamaged(path: path, location: why) }
        guard XMLElement.local(root.name) == "Envelope" else { throw bad("the root element is <\(root.name)>, not an OVF <Envelope>") }
        for r in root.children("References") {
            for f in r.children("File") {
                guard let id = f.attribute("id"), let href = f.attribute("href") else {
                    throw bad("References/File without ovf:id or ovf:href")
                }
                guard !files.contains(where: { $0.id == id }) else { throw bad("References/File id '\(id)' appears twice") }
                var size: UInt64? = nil
                if let s = f.attribute("size") {
                    guard let v = UInt64(s.trimmingWhitespace) else { throw bad("References/File '\(id)' ovf:size '\(s)' is not a number") }
                    size = v
                }
                let compression = f.attribute("compression")
                guard compression == nil || compression == "gzip" || compression == "identity" else {
                    throw .unsupported(path: path, what: "References/File '\(id)' ovf:compression '\(compression!)' (gzip is read)")
                }
                if f.attribute("chunkSize") != nil {
                    throw .unsupported(path: path, what: "References/File '\(id)' is split into chunks (ovf:chunkSize); join them first")
                }
                files.append(File(id: id, href: href, size: size, gzip: compression == "gzip"))
            }
        }
        for section in root.children("DiskSection") {
            for d in section.children("Disk") {
                guard let id = d.attribute("diskId") else { throw bad("DiskSection/Disk without ovf:diskId") }
                guard !disks.contains(where: { $0.id == id }) else { throw bad("DiskSection/Disk id '\(id)' appears twice") }
                guard let c = d.attribute("capacity") else { throw bad("Disk '\(id)' has no ovf:capacity") }
                let units = try Self.units(d.attribute("capacityAllocationUnits") ?? "byte", path: path, what: "Disk '\(id)' ovf:capacityAllocationUnits")
                guard let n = UInt64(c.trimmingWhitespace) else { throw bad("Disk '\(id)' ovf:capacity '\(c)' is not a number") }
                let (bytes, overflow) = n.multipliedReportingOverflow(by: units)
                guard !overflow, bytes < 1 << 62 else { throw bad("Disk '\(id)' capacity \(c) × \(units) is too large") }
                let ref = d.attribute("fileRef")
                if let ref, !files.contains(where: { $0.id == ref }) {
                    throw bad("Disk '\(id)' ovf:fileRef '\(ref)' names no References/File")
                }
                disks.append(Disk(id: id, fileRef: ref, capacity: bytes, format: d.attribute("format")))
            }
        }
        // The first virtual system (a VirtualSystemCollection's first member too).
        guard let system = root.descendants("VirtualSystem").first else { return }
        name = system.value("Name") ?? system.attribute("id")
        guard let hardware = system.child("VirtualHardwareSection") else { return }
        for item in hardware.children("Item") + hardware.children("EthernetPortItem") {
            guard let type = item.value("ResourceType") else { continue }
            switch type {
            case "3":
                if let q = item.value("VirtualQuantity") {
                    guard let n = Int(q), n > 0, n <= 4096 else { throw bad("the CPU Item's VirtualQuantity '\(q)' is not a CPU count") }
                    cpus = n
                }
            case "4":
                if let q = item.value("VirtualQuantity") {
                    let units = try Self.units(item.value("AllocationUnits") ?? "byte * 2^20", path: path, what: "the memory Item's AllocationUnits")
                    guard let n = UInt64(q) else { throw bad("the memory Item's VirtualQuantity '\(q)' is not a number") }
                    let (bytes, overflow) = n.multipliedReportingOverflow(by: units)
                    guard !overflow else { throw bad("the memory Item's size \(q) × \(units) is too large") }
                    memoryMiB = bytes >> 20
                }
            case "10":
                nics.append(NIC(name: item.value("ElementName") ?? item.value("Caption"), type: item.value("ResourceSubType"),
                                connection: item.value("Connection"), mac: item.value("Address")))
            default: break
            }
        }
    }

    /// Bytes per unit of a programmatic unit ("byte", "byte * 2^30", "byte * 1024", "MegaBytes", …;
    /// DSP0004 Annex C).
    static func units(_ s: String, path: String, what: String) throws(QcowPressError) -> UInt64 {
        let t = s.trimmingWhitespace
        let named: [String: UInt64] = ["byte": 1, "bytes": 1, "KB": 1 << 10, "KiloBytes": 1 << 10, "MB": 1 << 20, "MegaBytes": 1 << 20,
                                       "GB": 1 << 30, "GigaBytes": 1 << 30, "TB": 1 << 40, "TeraBytes": 1 << 40]
        if let v = named[t] { return v }
        let parts = t.split(separator: "*").map { String($0).trimmingWhitespace }
        if parts.count == 2, parts[0].lowercased() == "byte" {
            let f = parts[1]
            if let caret = f.firstIndex(of: "^"), let base = UInt64(f[..<caret]), let exp = UInt64(f[f.index(after: caret)...]),
               base == 2 || base == 10 {
                var v: UInt64 = 1
                for _ in 0..<exp {
                    let (m, o) = v.multipliedReportingOverflow(by: base)
                    guard !o, m < 1 << 62 else { throw .inputDamaged(path: path, location: "\(what) '\(s)' is too large") }
                    v = m
                }
                return v
            }
            if let v = UInt64(f), v > 0 { return v }
        }
        throw .unsupported(path: path, what: "\(what) '\(s)' (expected byte, byte * 2^N or byte * N)")
    }
}
