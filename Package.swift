// swift-tools-version:6.1
import PackageDescription

// Boundaries (enforced by the dependency graph below):
//   Qcow2Format        pure value types, no I/O, no C
//   ClusterCompression codecs; the only place zlib/zstd/ISA-L enter
//   DirectIO           the only target that talks to the kernel (files, io_uring, pwrite, unix sockets)
//   QcowPress          the engine, image readers, and the public library API
//   NIOSupport         what the NIO clients share: connect awaiting the TLS handshake, certificate fingerprints
//   S3Client           S3 on SwiftNIO: SigV4, GET/HEAD/ListObjectsV2, pinned TLS; knows nothing of PBS
//   PBSS3              a PBS 4 datastore in an S3 bucket as a PBS snapshot source and chunk store
//   NBDServer          the NBD protocol on SwiftNIO (serves anything behind NBDExport)
//   NBDExports         the engine's images, PBS snapshots, live restores and backup sink as exports
//   QEMUControl        QEMU's monitor (QMP): a client with a deadline on every exchange, and the
//                      switch of a VM's block nodes onto restored images
//   qcowpress          the command line, a thin layer over QcowPress
let package = Package(
    name: "QcowPress",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "QcowPress", targets: ["QcowPress"]),
        .executable(name: "qcowpress", targets: ["qcowpress"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio-http2", from: "1.46.0"),
    ],
    targets: [
        .systemLibrary(name: "CURing", pkgConfig: "liburing", providers: [.apt(["liburing-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CISAL", pkgConfig: "libisal", providers: [.apt(["libisal-dev"])]),
        .target(name: "Qcow2Format"),
        .target(name: "ClusterCompression", dependencies: ["CZstd", "CZlib", "CISAL"]),
        .target(name: "DirectIO", dependencies: ["CURing"]),
        // Backup formats (PBS datastore, VMA archives): parsing, verification, decryption. Knows
        // nothing of qcow2 allocation; zstd enters here for whole-blob and whole-stream
        // decoding, ISA-L for the blobs' CRC; a .vma.gz inflates through ClusterCompression's
        // GzipStreamInflater (the one the OVA import uses).
        .target(name: "BackupSources", dependencies: [
            "DirectIO", "CZstd", "CISAL",
            "ClusterCompression",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "_CryptoExtras", package: "swift-crypto"),
        ]),
        .target(name: "QcowPress", dependencies: [
            "Qcow2Format", "ClusterCompression", "DirectIO", "BackupSources", "PBSRemote", "PBSS3",
            .product(name: "Logging", package: "swift-log"),
            // SHA-256/SHA-1 of an OVA's manifest, computed while the files stream.
            .product(name: "Crypto", package: "swift-crypto"),
            // ByteBuffer only: the PBS chunk cache holds chunks in buffers an NBD reply can send.
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        // The NBD protocol on SwiftNIO (fixed newstyle, structured replies, block status): knows
        // nothing of qcow2; what it serves comes in through the NBDExport protocol.
        .target(name: "NBDServer", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            // NBD_OPT_STARTTLS: TLS with x509 client certificates, as qemu-nbd.
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
        // The engine's NBD exports: images, PBS snapshots and live restores served read-only, and the
        // backup sink (a writable export whose writes go into an encoder, and the policy deciding
        // whether the backup is complete). The command line sees export sets and servers, never
        // the adapters or the protocol.
        .target(name: "NBDExports", dependencies: [
            "QcowPress", "NBDServer", "DirectIO",
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        // A Proxmox Backup Server client (HTTPS login, the reader protocol over HTTP/2): fetches
        // manifests, indexes and raw chunk blobs; verification stays in BackupSources.
        .target(name: "PBSRemote", dependencies: [
            "BackupSources",
            "NIOSupport",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // What the NIO clients (PBSRemote, S3Client) share: a TCP connect that awaits the TLS
        // handshake with a deadline, and the SHA-256 fingerprint of a certificate.
        .target(name: "NIOSupport", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // An S3 client (AWS Signature V4, GET/HEAD/ListObjectsV2 over kept-alive HTTP/1.1 on NIO,
        // TLS by the system CAs or a pinned fingerprint): knows nothing of PBS.
        .target(name: "S3Client", dependencies: [
            "NIOSupport",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // A PBS 4 datastore on S3-compatible object storage, read from the bucket without a PBS
        // server: snapshots, listings and chunk fetches over S3Client; verification stays in BackupSources.
        .target(name: "PBSS3", dependencies: ["BackupSources", "S3Client"]),
        // QEMU's monitor (QMP) on a unix socket: knows nothing of qcow2, NBD or the command line;
        // its socket calls go through DirectIO's seam.
        .target(name: "QEMUControl", dependencies: ["DirectIO"]),
        // Examples of the public API (built and run by the tests; README's snippet is one of them).
        .executableTarget(name: "qcowpress-examples", dependencies: ["QcowPress"], path: "Examples"),
        .executableTarget(name: "qcowpress", dependencies: [
            "QcowPress", "NBDExports", "DirectIO", "QEMUControl",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Mutation fuzzer over every input parser (fuzz/run.sh); not part of the library.
        .executableTarget(name: "qcowpress-fuzz", dependencies: [
            "QcowPress", "Qcow2Format", "BackupSources", "DirectIO", "S3Client",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // What every test target shares: the Swift Testing tags (fast, e2e, nbd, pbs, faults,
        // property) and the seeded generator of the property tests.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "Qcow2FormatTests", dependencies: ["TestSupport", "Qcow2Format"]),
        .testTarget(name: "ClusterCompressionTests", dependencies: ["TestSupport", "ClusterCompression"]),
        .testTarget(name: "DirectIOTests", dependencies: ["TestSupport", "DirectIO"]),
        .testTarget(name: "QEMUControlTests", dependencies: ["TestSupport", "QEMUControl"]),
        .testTarget(name: "BackupSourcesTests", dependencies: ["TestSupport", "BackupSources"]),
        .testTarget(name: "QcowPressTests", dependencies: ["TestSupport", "QcowPress", "Qcow2Format", "ClusterCompression", "DirectIO"]),
        .testTarget(name: "S3ClientTests", dependencies: [
            "TestSupport", "S3Client",
            .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .testTarget(name: "CLITests", dependencies: ["TestSupport", "Qcow2Format", "QcowPress", "qcowpress", "qcowpress-fuzz", "qcowpress-examples"]),
    ]
)
