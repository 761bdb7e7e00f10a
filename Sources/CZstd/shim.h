#ifndef CZSTD_SHIM_H
#define CZSTD_SHIM_H
#if __has_include(<zstd.h>)
#include <zstd.h>
#include <zstd_errors.h>
#else
#error "zstd.h not found: install libzstd-dev, or run scripts/bootstrap.sh"
#endif
#endif
