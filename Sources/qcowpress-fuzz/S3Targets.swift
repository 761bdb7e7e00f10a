import S3Client

/// s3-xml: S3's answers as the client reads them (ListObjectsV2 pages, <Error> documents). An
/// error is the expected outcome of a damaged document; a trap or a hang is a finding.
func fuzzS3XML(_ input: [UInt8]) {
    _ = try? S3Documents.listing(input)
    _ = S3Documents.error(input)
}
