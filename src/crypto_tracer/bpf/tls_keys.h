/* SPDX-License-Identifier: GPL-2.0 */
/* TLS secrets, read at the return of handshake and data calls (owned by the keylog work).
 * tls.bpf.c calls tls_keys_on_return(ssl, lib_kind) at every SSL_* return; it must cost one
 * map lookup when the session's keys are already known or keys are not wanted. */
#ifndef CT_TLS_KEYS_H
#define CT_TLS_KEYS_H

static __always_inline void tls_keys_on_return(void *ctx, __u64 ssl, __u32 lib_kind)
{
}

#endif
