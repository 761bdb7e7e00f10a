@testable import S3Client
import Testing

@Suite(.tags(.fast)) struct S3XMLTests {
    static func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    @Test func listPageWithEntitiesAndPrefixes() throws {
        let doc = """
            <?xml version="1.0" encoding="UTF-8"?>
            <ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
              <Name>bkt</Name><Prefix>store/</Prefix><KeyCount>3</KeyCount><MaxKeys>1000</MaxKeys>
              <Delimiter>/</Delimiter><IsTruncated>false</IsTruncated>
              <Contents><Key>store/a&amp;b &lt;c&gt; &quot;d&quot; &apos;e&apos; &#233;&#x41;</Key>
                <LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>&quot;abc&quot;</ETag>
                <Size>4194304</Size><StorageClass>STANDARD</StorageClass></Contents>
              <Contents><Key>store/empty</Key><Size>0</Size></Contents>
              <!-- a comment -->
              <CommonPrefixes><Prefix>store/.chunks/</Prefix></CommonPrefixes>
              <CommonPrefixes><Prefix>store/.cnt/</Prefix></CommonPrefixes>
            </ListBucketResult>
            """
        let page = try ListPage.parse(Self.bytes(doc))
        #expect(page.objects == [S3Object(key: "store/a&b <c> \"d\" 'e' éA", size: 4_194_304), S3Object(key: "store/empty", size: 0)])
        #expect(page.commonPrefixes == ["store/.chunks/", "store/.cnt/"])
        #expect(!page.isTruncated)
        #expect(page.nextContinuationToken == nil)
    }

    @Test func truncatedPageCarriesItsToken() throws {
        let doc = "<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>1/abc+=</NextContinuationToken>"
            + "<Contents><Key>k</Key><Size>1</Size></Contents></ListBucketResult>"
        let page = try ListPage.parse(Self.bytes(doc))
        #expect(page.isTruncated)
        #expect(page.nextContinuationToken == "1/abc+=")
        #expect(throws: XMLError.self) {
            try ListPage.parse(Self.bytes("<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>"))
        }
    }

    @Test func emptyListingAndSelfClosingElements() throws {
        let page = try ListPage.parse(Self.bytes("<ListBucketResult><Name>b</Name><Prefix/><KeyCount>0</KeyCount></ListBucketResult>"))
        #expect(page.objects.isEmpty)
        #expect(page.commonPrefixes.isEmpty)
    }

    @Test func errorDocuments() {
        let doc = """
            <?xml version="1.0" encoding="UTF-8"?>
            <Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message>
            <Key>store/.chunks/abcd/x</Key><RequestId>4442587FB7D0A2F9</RequestId></Error>
            """
        #expect(S3ErrorDocument.parse(Self.bytes(doc)) == S3ErrorDocument(code: "NoSuchKey", message: "The specified key does not exist."))
        #expect(S3ErrorDocument.parse(Self.bytes("<Error><Code>SlowDown</Code></Error>"))
            == S3ErrorDocument(code: "SlowDown", message: ""))
        #expect(S3ErrorDocument.parse(Self.bytes("<html><body>502 Bad Gateway</body></html>")) == nil)
        #expect(S3ErrorDocument.parse([]) == nil)
        #expect(S3ErrorDocument.parse(Self.bytes("<Error><Code>X</Code>")) == nil)
        #expect(S3ErrorDocument.parse(Self.bytes("<Error><Message>m &amp; m</Message><Code><![CDATA[A<B]]></Code></Error>"))
            == S3ErrorDocument(code: "A<B", message: "m & m"))
    }

    @Test func damagedDocumentsAreRefusedNotCrashed() {
        let bad = [
            "", "plain text", "<ListBucketResult>", "<ListBucketResult></Other>", "<a><b></a></b>",
            "<ListBucketResult><Contents><Key>k</Key><Size>x</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>&bogus;</Key><Size>1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>&#1114112;</Key><Size>1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>& no semicolon here at all</Key></Contents></ListBucketResult>",
            "<Other/>", "<", "<ListBucketResult attr=\"unterminated",
            String(repeating: "<a>", count: 10_000),
        ]
        for doc in bad {
            #expect(throws: XMLError.self, "\(doc.prefix(60))") { try ListPage.parse(Self.bytes(doc)) }
        }
    }

    @Test func attributesAreSkipped() throws {
        let root = try S3XML.parse(Self.bytes("<a x='1>' y=\"/>\"><b k=\"v\">t</b></a>"))
        #expect(root["b"] == "t")
    }
}
