import QcowPress

/// ova-tar: an OVA's tar walked as the import walks it, from a file (headers only, data skipped)
/// and as a stream (read to the end). ovf: an OVF descriptor (XML) and a manifest (.mf) parsed.
/// An error is the expected outcome of a damaged input; a trap or a hang is a finding.
func fuzzOVA(_ target: String, _ input: [UInt8]) {
    switch target {
    case "ova-tar":
        let p = writeFile("a.ova", input)
        _ = try? OVAImport.entries(ofArchive: p)
        _ = try? OVAImport.entries(ofArchive: p, asStream: true)
    default:
        _ = try? OVFDescriptor(xml: input, path: "fuzz.ovf")
        _ = try? OVAImport.manifest(input, path: "fuzz.mf")
    }
}
