/* SPDX-License-Identifier: GPL-2.0 */
/* TLS secrets, read at points that occur once per connection (owned by the keylog work).
 *
 * tls.bpf.c calls tls_keys_on_return(ctx, ssl, lib_kind) at handshake returns, at the entry of
 * SSL_free (the object is intact there) and, in -m text/json only, at data call returns. SSL_new's
 * return puts the object into keys_pending: user space (keys/pending.py) reads its secrets from
 * process memory until they are complete (handshakes driven inside SSL_read/SSL_write, as in
 * node), and a process's exit_group reads every pending object of the process (tls_keys_sweep). Where the secrets live in the SSL object is learned per library build by user
 * space (crypto_tracer/keys/calibrate.py) and written into `keys_layouts[slot]`; the slot of
 * a hooked library file is in bits 16-19 of its uprobes' cookie. With no layout in the slot
 * (keys not wanted, or the library's layout is unknown) nothing is read at all.
 * Once a session's record went out, `keys_done` remembers (tgid, ssl) -> first 8 bytes of
 * client_random, so later calls cost one map lookup and one 8-byte read; a reused SSL*
 * (new handshake, new client_random) is noticed and read again.
 * Secrets are only final at returns (node fills them during SSL_write), so a record is sent
 * only when every secret its TLS version needs is non-zero.
 */
#ifndef CT_TLS_KEYS_H
#define CT_TLS_KEYS_H

enum tls_keys_const {
	CT_TLS_SECRET_LEN = 64,
	CT_TLS_MASTER_KEY_LEN = 48,
	CT_TLS_KEYS_SLOTS = 16, /* slot 0: no keys */
	CT_TLS_KEYS_SLOT_SHIFT = 16,
};
#define CT_TLS_KEYS_SLOT(cookie) (((cookie) >> CT_TLS_KEYS_SLOT_SHIFT) & (CT_TLS_KEYS_SLOTS - 1))

/* Offsets in bytes; a negative cr_deref means client_random is in the SSL object itself, a
 * negative session_off that the master key is too (GnuTLS). */
struct ct_keys_layout {
	__u32 enabled;
	__s32 cr_deref;
	__s32 cr_off;
	__s32 version_off;
	__s32 session_off;
	__s32 master_key_off; /* in SSL_SESSION */
	__s32 cipher_off;     /* SSL_CIPHER pointer in SSL_SESSION */
	__s32 cipher_id_off;  /* u32 id in SSL_CIPHER */
	__s32 hs_a_off;       /* handshake_secret (or CHTS when stored) */
	__s32 hs_b_off;       /* handshake_traffic_hash (or SHTS when stored) */
	__s32 client_app_off;
	__s32 server_app_off;
	__s32 exporter_off;
	__s32 version_deref;     /* >= 0: the version is behind a pointer (GnuTLS) */
	__s32 version_be;        /* two bytes major, minor instead of an int 0x0304 */
	__s32 cipher_in_session; /* the cipher pointer is in the session (OpenSSL) or the object */
	__s32 cipher_id_be;      /* two bytes of the suite id (GnuTLS) */
};

/* One CT_EV_TLS_KEYS record (464 bytes); decoded by crypto_tracer/keys/tls_keys.py. */
struct ct_tls_keys_event {
	struct ct_header h;
	__u64 ssl;
	__u32 lib_kind;
	__s32 version;
	__u32 cipher_id;
	__u32 slot; /* the layout that was used */
	__u8 client_random[32];
	__u8 master_key[CT_TLS_MASTER_KEY_LEN];
	__u8 hs_a[CT_TLS_SECRET_LEN];
	__u8 hs_b[CT_TLS_SECRET_LEN];
	__u8 client_app[CT_TLS_SECRET_LEN];
	__u8 server_app[CT_TLS_SECRET_LEN];
	__u8 exporter[CT_TLS_SECRET_LEN];
};

/* What tls_keys_read found. */
enum tls_keys_status {
	CT_KEYS_DONE = 0,       /* sent now or before */
	CT_KEYS_INCOMPLETE = 1, /* a handshake started (client_random set), secrets not all there */
	CT_KEYS_NOTHING = 2,    /* no layout, no ClientHello yet, or the ring was full */
};

/* CT_EV_TLS_OBJECT: an SSL object of a traced library was created or freed (keys/pending.py). */
enum tls_obj_event {
	CT_OBJ_NEW = 1,
	CT_OBJ_FREE = 2,            /* its keys were out (or it never started a handshake) */
	CT_OBJ_FREE_INCOMPLETE = 3, /* freed with a handshake started and its secrets incomplete */
};

struct ct_tls_obj_rec {
	struct ct_header h;
	__u64 ssl;
	__u32 slot;
	__u32 event;
};

struct ct_keys_pending_val {
	__u32 slot;
	__u32 lib_kind;
};

struct ct_keys_done_key {
	__u64 ssl;
	__u32 tgid;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CT_TLS_KEYS_SLOTS);
	__type(key, __u32);
	__type(value, struct ct_keys_layout);
} keys_layouts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ct_keys_done_key);
	__type(value, __u64);
} keys_done SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_tls_keys_event);
} keys_scratch SEC(".maps");

/* (tgid, ssl) -> its layout: objects SSL_new returned and SSL_free has not freed yet */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ct_keys_done_key);
	__type(value, struct ct_keys_pending_val);
} keys_pending SEC(".maps");

/* tgids with an entry in keys_pending: exit_group sweeps only those */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u8);
} keys_pending_tgid SEC(".maps");

static __always_inline __u64 tls_keys_ptr_at(__u64 base, __s32 off)
{
	__u64 p = 0;
	if (base)
		bpf_probe_read_user(&p, sizeof(p), (void *)(base + off));
	return p;
}

static __always_inline __u32 tls_keys_swap16(__u32 v)
{
	return ((v & 0xff) << 8) | ((v >> 8) & 0xff);
}

static __always_inline bool tls_keys_nonzero(const __u8 *b)
{
	return *(const __u64 *)b != 0;
}

static __always_inline int tls_keys_read(__u64 ssl, __u32 lib_kind, __u32 slot)
{
	struct ct_keys_layout *lay = bpf_map_lookup_elem(&keys_layouts, &slot);
	if (!slot || !lay || !lay->enabled || !ssl)
		return CT_KEYS_NOTHING;

	__u64 cr_base = lay->cr_deref >= 0 ? tls_keys_ptr_at(ssl, lay->cr_deref) : ssl;
	__u64 cr8 = tls_keys_ptr_at(cr_base, lay->cr_off);
	if (!cr8)
		return CT_KEYS_NOTHING; /* no ClientHello yet */
	struct ct_keys_done_key key = { .ssl = ssl, .tgid = bpf_get_current_pid_tgid() >> 32 };
	__u64 *done = bpf_map_lookup_elem(&keys_done, &key);
	if (done && *done == cr8)
		return CT_KEYS_DONE; /* this session's keys went out already */

	__u32 zero = 0;
	struct ct_tls_keys_event *e = bpf_map_lookup_elem(&keys_scratch, &zero);
	if (!e)
		return CT_KEYS_NOTHING;
	__u64 vbase = lay->version_deref >= 0 ? tls_keys_ptr_at(ssl, lay->version_deref) : ssl;
	e->version = 0;
	if (vbase)
		bpf_probe_read_user(&e->version, sizeof(e->version), (void *)(vbase + lay->version_off));
	if (lay->version_be)
		e->version = tls_keys_swap16(e->version);
	bpf_probe_read_user(e->client_random, sizeof(e->client_random), (void *)(cr_base + lay->cr_off));
	if (e->version == 0x0304) {
		bpf_probe_read_user(e->hs_a, sizeof(e->hs_a), (void *)(ssl + lay->hs_a_off));
		bpf_probe_read_user(e->hs_b, sizeof(e->hs_b), (void *)(ssl + lay->hs_b_off));
		bpf_probe_read_user(e->client_app, sizeof(e->client_app), (void *)(ssl + lay->client_app_off));
		bpf_probe_read_user(e->server_app, sizeof(e->server_app), (void *)(ssl + lay->server_app_off));
		bpf_probe_read_user(e->exporter, sizeof(e->exporter), (void *)(ssl + lay->exporter_off));
		if (!tls_keys_nonzero(e->hs_a) || !tls_keys_nonzero(e->hs_b) || !tls_keys_nonzero(e->client_app) ||
		    !tls_keys_nonzero(e->server_app) || !tls_keys_nonzero(e->exporter))
			return CT_KEYS_INCOMPLETE; /* handshake not finished yet */
		__builtin_memset(e->master_key, 0, sizeof(e->master_key));
	} else {
		__builtin_memset(e->hs_a, 0, sizeof(e->hs_a) * 5);
	}
	__u64 session = lay->session_off >= 0 ? tls_keys_ptr_at(ssl, lay->session_off) : ssl;
	if (!session)
		return CT_KEYS_INCOMPLETE;
	if (e->version != 0x0304) {
		bpf_probe_read_user(e->master_key, sizeof(e->master_key), (void *)(session + lay->master_key_off));
		if (!tls_keys_nonzero(e->master_key))
			return CT_KEYS_INCOMPLETE;
	}
	__u64 cipher = tls_keys_ptr_at(lay->cipher_in_session ? session : ssl, lay->cipher_off);
	e->cipher_id = 0;
	if (cipher)
		bpf_probe_read_user(&e->cipher_id, sizeof(e->cipher_id), (void *)(cipher + lay->cipher_id_off));
	if (lay->cipher_id_be)
		e->cipher_id = tls_keys_swap16(e->cipher_id);
	if (!e->cipher_id)
		return CT_KEYS_INCOMPLETE;

	ct_fill_header(&e->h, CT_EV_TLS_KEYS);
	e->ssl = ssl;
	e->lib_kind = lib_kind;
	e->slot = slot;
	ct_count(CT_CNT_SEEN);
	if (!ct_process_wanted(e->h.pid, e->h.uid, e->h.comm))
		ct_count(CT_CNT_KFILTERED);
	else if (ct_output(e, sizeof(*e)))
		return CT_KEYS_NOTHING; /* ring full: counted as a drop, read again at the next point */
	bpf_map_update_elem(&keys_done, &key, &cr8, BPF_ANY);
	return CT_KEYS_DONE;
}

/* At a uprobe: the layout slot is in the cookie. */
static __always_inline int tls_keys_on_return(void *ctx, __u64 ssl, __u32 lib_kind)
{
	return tls_keys_read(ssl, lib_kind, CT_TLS_KEYS_SLOT(bpf_get_attach_cookie(ctx)));
}

struct tls_keys_sweep_ctx {
	__u32 tgid;
};

static long tls_keys_sweep_one(struct bpf_map *map, struct ct_keys_done_key *key, struct ct_keys_pending_val *val,
			       struct tls_keys_sweep_ctx *c)
{
	if (key->tgid != c->tgid)
		return 0;
	tls_keys_read(key->ssl, val->lib_kind, val->slot);
	bpf_map_delete_elem(map, key);
	return 0;
}

/* exit_group: the process's memory is intact still; read the objects whose keys may not be out
 * (a program that exits right after an implicit handshake, without SSL_free). */
static __always_inline void tls_keys_sweep(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct tls_keys_sweep_ctx c = {.tgid = tgid};

	if (!bpf_map_lookup_elem(&keys_pending_tgid, &tgid))
		return;
	bpf_map_delete_elem(&keys_pending_tgid, &tgid);
	bpf_for_each_map_elem(&keys_pending, tls_keys_sweep_one, &c, 0);
}

#endif
