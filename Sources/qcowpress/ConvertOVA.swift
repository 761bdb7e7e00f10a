import QcowPress

extension Convert {
    /// `convert VM.ova|VM.ovf|- OUTDIR`: every disk of the OVF into OUTDIR as qcow2, plus vm.json.
    func runImport() throws {
        guard sourceFormat == nil, backing == nil, backingFormat == nil, outputFormat == "qcow2" else {
            throw QcowPressError.invalidArgument("convert VM.ova|VM.ovf|- OUTDIR takes no -f, -O, -B or -F (every disk becomes a qcow2 in OUTDIR)")
        }
        _ = try ImageOptionParser(encoder.formatOptions)
        var r = OVAImport(source: source, outdir: destination)
        r.overwrite = encoder.force
        if let readers { r.readers = readers }
        warnAboutLeftovers(in: destination)
        let eo = try encoder.encoderOptions(virtualSize: 0)
        let encoders = EncodersProgress()
        var bar: ProgressBar? = nil
        defer { bar?.stop() }
        let show = encoder.progress
        let summary = try r.run(encoder: eo, started: { e in
            watch(e)
            encoders.add(e)
            bar?.stop()
            if show { bar = ProgressBar(total: e.virtualSize) { e.bytesDone } }
        })
        bar?.stop()
        bar = nil
        if encoder.output == .json { print(try encodeJSON(summary)) }
    }
}
