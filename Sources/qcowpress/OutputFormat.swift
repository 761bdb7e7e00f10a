import ArgumentParser

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

/// Parses sizes as qemu-img does: a number with an optional k/M/G/T suffix (powers of 1024).
func parseSize(_ s: String, what: String) throws -> Int {
    let units: [Character: Int] = ["k": 10, "K": 10, "m": 20, "M": 20, "g": 30, "G": 30, "t": 40, "T": 40]
    var digits = s
    var shift = 0
    if let last = s.last, let u = units[last] {
        shift = u
        digits.removeLast()
    } else if s.hasSuffix("B") || s.hasSuffix("b") {
        digits.removeLast()
    }
    guard let n = Int(digits), n >= 0, n <= Int.max >> shift else {
        throw ValidationError("\(what) '\(s)' is not a size (e.g. 65536, 64k, 2M)")
    }
    return n << shift
}
