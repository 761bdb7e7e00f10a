#ifndef CISAL_SHIM_H
#define CISAL_SHIM_H
#include <stdint.h>
#if __has_include(<isa-l/igzip_lib.h>)
#include <isa-l/igzip_lib.h>
#include <isa-l/crc.h>
#else
#error "isa-l/igzip_lib.h not found: install libisal-dev, or run scripts/bootstrap.sh"
#endif
static const uint32_t CISAL_LVL1_BUF_SIZE = ISAL_DEF_LVL1_DEFAULT;
static const int CISAL_STATELESS_OVERFLOW = STATELESS_OVERFLOW;
static const int CISAL_COMP_OK = COMP_OK;
#endif
