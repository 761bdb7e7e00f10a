import QcowPress

/// ova-tar: an OVA's tar walked as the import walks it: in memory on every run (the walker and
/// header parser, as over a file: data skipped), and on one run in 64 from a file both ways (header
/// by header, and as a stream read to the end; files cost about 6 ms a run here). ovf: an OVF descriptor (XML) and a manifest (.mf) parsed.
/// An error is the expected outcome of a damaged input; a trap or a hang is a finding.
nonisolated(unsafe) var ovaRuns = 0

func fuzzOVA(_ target: String, _ input: [UInt8]) {
    switch target {
    case "ova-tar":
        _ = try? OVAImport.entries(ofArchiveBytes: input, name: "fuzz.ova")
        ovaRuns &+= 1
        if ovaRuns % 64 == 0 {
            let p = writeFile("a.ova", input)
            _ = try? OVAImport.entries(ofArchive: p)
            _ = try? OVAImport.entries(ofArchive: p, asStream: true)
        }
    default:
        _ = try? OVFDescriptor(xml: input, path: "fuzz.ovf")
        _ = try? OVAImport.manifest(input, path: "fuzz.mf")
    }
}
