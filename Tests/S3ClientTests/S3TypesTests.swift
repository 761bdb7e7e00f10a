import S3Client
import Testing

@Suite(.tags(.fast)) struct S3TypesTests {
    @Test func credentialsDescriptionHidesTheSecret() {
        let c = S3Credentials(accessKeyID: "AKID", secretAccessKey: "s3cr3t-value", sessionToken: "tok-value")
        #expect(!"\(c)".contains("s3cr3t"))
        #expect(!String(reflecting: c).contains("s3cr3t"))
        #expect(!"\(c)".contains("tok-value"))
    }
}
