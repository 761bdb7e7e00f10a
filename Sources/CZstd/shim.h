#ifndef CZSTD_SHIM_H
#define CZSTD_SHIM_H
#if __has_include(<zstd.h>)
// The static-only part gives ZSTD_estimateCCtxSize_usingCParams (the memory plan); Debian's
// libzstd.so exports it.
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>
#include <zstd_errors.h>
#else
#error "zstd.h not found: install libzstd-dev, or run scripts/bootstrap.sh"
#endif
#endif
