/// A streamOptimized VMDK decoded as its bytes pass (stdin's tar entry, a gzip-stored file).
enum OVAStreamVMDK {
    static func convert(_ job: OVADiskJob, from source: OVAByteSource, name: String, outputs: OVAOutputs,
                        protecting: [ProtectedInput]) throws(QcowPressError) -> UInt64 {
        throw .unsupported(path: name, what: "a streamOptimized VMDK read from a stream (not yet: pass the OVA as a file)")
    }
}
