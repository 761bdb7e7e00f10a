extension ImageInfo {
    /// What `qemu-img info` shows of a VMDK under "Format specific information" (QEMU's
    /// ImageInfoSpecificVmdk): the descriptor's CID and parentCID, the create type, and one entry
    /// per extent qemu opens (ZERO extents, which qemu skips, are not listed).
    public struct VMDKSpecific: Sendable, Codable, Equatable {
        public struct Extent: Sendable, Codable, Equatable {
            /// The extent's file as opened: the descriptor's folder joined with the name written.
            public var filename: String
            /// The descriptor's extent type (SPARSE, FLAT, VMFS); "" for a lone sparse file, as qemu.
            public var format: String
            public var virtualSize: UInt64
            /// Sparse extents only: the grain size.
            public var clusterSize: Int?
            /// Present (true) only for an extent with compressed grains, as qemu.
            public var compressed: Bool?
            enum CodingKeys: String, CodingKey {
                case filename, format, compressed
                case virtualSize = "virtual-size"
                case clusterSize = "cluster-size"
            }
        }
        /// nil when the descriptor has no CID (qemu refuses such an image; QcowPress reads it).
        public var cid: UInt32?
        public var parentCid: UInt32?
        public var createType: String
        public var extents: [Extent]
        enum CodingKeys: String, CodingKey {
            case cid, extents
            case parentCid = "parent-cid"
            case createType = "create-type"
        }

        /// The lines under "Format specific information:", in qemu-img's order (its QDict's).
        var text: String {
            var s = ""
            if let cid { s += "    cid: \(cid)\n" }
            if let parentCid { s += "    parent cid: \(parentCid)\n" }
            s += "    create type: \(createType)\n    extents:\n"
            for (i, e) in extents.enumerated() {
                s += "        [\(i)]:\n"
                if let c = e.compressed { s += "            compressed: \(c)\n" }
                s += "            virtual size: \(e.virtualSize)\n            filename: \(e.filename)\n"
                if let c = e.clusterSize { s += "            cluster size: \(c)\n" }
                s += "            format: \(e.format)\n"
            }
            return s
        }
    }
}

extension VMDKImage {
    /// The format-specific block of `info`.
    public var formatSpecific: ImageInfo.VMDKSpecific {
        ImageInfo.VMDKSpecific(cid: cid, parentCid: parentCID, createType: createType, extents: extentInfo)
    }

    /// One extent as `info` lists it.
    static func extentInfo(file: String, format: String, size: UInt64, sparse: VMDKSparseExtent?) -> ImageInfo.VMDKSpecific.Extent {
        ImageInfo.VMDKSpecific.Extent(filename: file, format: format, virtualSize: size,
                                      clusterSize: sparse.map { Int($0.grainBytes) },
                                      compressed: sparse?.header.compressed == true ? true : nil)
    }
}
