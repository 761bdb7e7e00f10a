// Types from the lower targets that appear in the public API, re-exported so that a client needs
// only `import QcowPress`.
@_exported import struct ClusterCompression.CompressionSettings
@_exported import enum DirectIO.IOMode
@_exported import struct DirectIO.IOError
@_exported import struct BackupSources.PBSFixedIndex
