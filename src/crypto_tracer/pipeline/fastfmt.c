/* tls -m text / -m json's per-record loop in C (pipeline/fastfmt.py drives it; the pure-Python
 * loop in sinks/text.py and sinks/json.py stays, and is the reference this must equal byte for
 * byte: tests/unit/test_fastfmt.py).
 *
 * ct_fmt_run() walks the committed records of the tls ring buffer (its mmap'ed pages, laid out as
 * engine/ringread.py describes) from the consumer position, formats each data record of a
 * connection Python has already prepared (ct_fmt_learn: a recipe of literal pieces and slots)
 * into an output buffer, and returns the records' space to the kernel. It stops, leaving the
 * record in the ring, at anything else: another record type, a connection it does not know, a
 * record the general path formats (a chunk of a longer call, truncation, valid non-ASCII UTF-8 in
 * text), a record that wraps the ring's end. Python then handles a few records its own way and
 * calls again. Records are only read here; nothing is kept from one call to the next but the
 * connections' recipes and the last second's timestamp text.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BUSY_BIT (1u << 31)
#define DISCARD_BIT (1u << 30)
#define HEADER_SIZE 8
#define KEY_MAX 128

enum stop { STOP_EMPTY = 0, STOP_PYTHON = 1, STOP_FULL = 2 };
/* slots of a recipe, between its literal pieces (pipeline/fastfmt.py SLOT_*) */
enum slot { SLOT_END = 0, SLOT_LITERAL, SLOT_PREFIX, SLOT_MICROS, SLOT_LENGTH, SLOT_OFFSET, SLOT_TRUNCATED,
	    SLOT_BASE64, SLOT_TEXT_BODY };

/* where struct tls_data_rec keeps what the loop reads (probes/tls.py's layout, passed once) */
struct layout {
	uint32_t type_off, data_type, ts_off, length_off, offset_off, chunk_off, trunc_off, data_off;
	uint32_t key0, key1, key2, key3; /* DATA_KEY_SPANS: [key0, key1) + [key2, key3) */
	uint32_t text;                   /* 1: text's conditions (whole calls only), 0: json */
	uint64_t plain_limit;            /* text: longer payloads go the general way */
	uint8_t printable[256];          /* text: sinks/text.PRINTABLE */
};

struct conn {
	uint32_t key_len;
	uint8_t key[KEY_MAX];
	uint8_t skip;       /* filtered out: counted, not written */
	uint32_t recipe_len;
	uint8_t *recipe;    /* (slot u8, for SLOT_LITERAL: u32 length + bytes)*, SLOT_END */
};

struct ctx {
	struct layout lay;
	uint32_t cap, used; /* open addressing; emptied when half full */
	struct conn *conns;
	int64_t sec;        /* the last timestamp's epoch second and its text */
	char prefix[32];
	uint32_t prefix_len;
};

struct result { /* what one ct_fmt_run did */
	uint64_t cons;    /* the consumer position it left */
	uint64_t records; /* consumed: written + filtered */
	uint64_t written;
	uint64_t out_len;
};

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static uint16_t B64_PAIRS[4096]; /* the two characters of each 12-bit value: two lookups per 3 bytes */

static void base64_init(void)
{
	for (int v = 0; v < 4096; v++) {
		char pair[2] = {B64[v >> 6], B64[v & 63]};
		memcpy(&B64_PAIRS[v], pair, 2);
	}
}

static char *base64(char *o, const uint8_t *s, uint64_t n)
{
	uint64_t i = 0;
	for (; i + 3 <= n; i += 3) {
		uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
		memcpy(o, &B64_PAIRS[v >> 12], 2);
		memcpy(o + 2, &B64_PAIRS[v & 4095], 2);
		o += 4;
	}
	if (n - i == 1) {
		uint32_t v = (uint32_t)s[i] << 16;
		o[0] = B64[v >> 18];
		o[1] = B64[(v >> 12) & 63];
		o[2] = o[3] = '=';
		o += 4;
	} else if (n - i == 2) {
		uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8;
		o[0] = B64[v >> 18];
		o[1] = B64[(v >> 12) & 63];
		o[2] = B64[(v >> 6) & 63];
		o[3] = '=';
		o += 4;
	}
	return o;
}

static uint64_t hash_key(const uint8_t *k, uint32_t n)
{
	uint64_t h = 1469598103934665603ull; /* FNV-1a */
	for (uint32_t i = 0; i < n; i++)
		h = (h ^ k[i]) * 1099511628211ull;
	return h;
}

struct ctx *ct_fmt_new(const struct layout *lay, uint32_t cap)
{
	struct ctx *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	if (!B64_PAIRS[0])
		base64_init();
	c->lay = *lay;
	c->cap = cap;
	c->sec = -1;
	c->conns = calloc(cap, sizeof(struct conn));
	if (!c->conns) {
		free(c);
		return NULL;
	}
	return c;
}

void ct_fmt_clear(struct ctx *c)
{
	for (uint32_t i = 0; i < c->cap; i++) {
		free(c->conns[i].recipe);
		memset(&c->conns[i], 0, sizeof(struct conn));
	}
	c->used = 0;
}

void ct_fmt_free(struct ctx *c)
{
	if (!c)
		return;
	ct_fmt_clear(c);
	free(c->conns);
	free(c);
}

static struct conn *find(struct ctx *c, const uint8_t *key, uint32_t n, int *found)
{
	uint32_t i = hash_key(key, n) & (c->cap - 1);
	for (;;) {
		struct conn *e = &c->conns[i];
		if (!e->key_len) {
			*found = 0;
			return e;
		}
		if (e->key_len == n && !memcmp(e->key, key, n)) {
			*found = 1;
			return e;
		}
		i = (i + 1) & (c->cap - 1);
	}
}

/* A connection's recipe (NULL: filtered out). Returns 1 when the table was emptied first (Python
 * empties its own cache then, so that every connection is learned here again), 0, or -1 (no memory). */
int ct_fmt_learn(struct ctx *c, const uint8_t *key, uint32_t key_len, const uint8_t *recipe, uint32_t recipe_len)
{
	int found, cleared = 0;
	if (key_len == 0 || key_len > KEY_MAX)
		return -1;
	if (c->used >= c->cap / 2) {
		ct_fmt_clear(c);
		cleared = 1;
	}
	struct conn *e = find(c, key, key_len, &found);
	uint8_t *copy = NULL;
	if (recipe) {
		copy = malloc(recipe_len);
		if (!copy)
			return -1;
		memcpy(copy, recipe, recipe_len);
	}
	if (found)
		free(e->recipe);
	else
		c->used++;
	e->key_len = key_len;
	memcpy(e->key, key, key_len);
	e->skip = recipe == NULL;
	e->recipe = copy;
	e->recipe_len = recipe_len;
	return cleared;
}

static char *decimal(char *o, uint64_t v)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*o++ = tmp[--n];
	return o;
}

/* Python's bytes.decode("utf-8") succeeds (strict: no overlong forms, surrogates or values past
 * U+10FFFF) */
static int valid_utf8(const uint8_t *s, uint64_t n)
{
	uint64_t i = 0;
	while (i < n) {
		uint8_t b = s[i];
		if (b < 0x80) {
			i++;
			continue;
		}
		uint32_t need, min;
		if (b >= 0xc2 && b <= 0xdf) {
			need = 1;
			min = 0x80;
		} else if (b >= 0xe0 && b <= 0xef) {
			need = 2;
			min = 0x800;
		} else if (b >= 0xf0 && b <= 0xf4) {
			need = 3;
			min = 0x10000;
		} else {
			return 0;
		}
		if (i + need >= n)
			return 0; /* cut short */
		uint32_t cp = b & (0x3f >> need);
		for (uint32_t k = 1; k <= need; k++) {
			uint8_t t = s[i + k];
			if ((t & 0xc0) != 0x80)
				return 0;
			cp = cp << 6 | (t & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return 0;
		i += need + 1;
	}
	return 1;
}

static int all_ascii(const uint8_t *s, uint64_t n)
{
	uint64_t acc = 0, w, i = 0;
	for (; i + 8 <= n; i += 8) { /* a word at a time */
		memcpy(&w, s + i, 8);
		acc |= w;
	}
	for (; i < n; i++)
		acc |= s[i];
	return !(acc & 0x8080808080808080ull);
}

static uint64_t rd64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static uint32_t rd32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

/* The formatted size of a record, at most (to check it fits before writing it). */
static uint64_t bound(const struct conn *e, uint64_t chunk)
{
	return e->recipe_len + 64 + 4 * (chunk / 3 + 1) + chunk;
}

/* One record into o (which has room for bound()); NULL: the general path must format it. */
static char *format(struct ctx *c, const struct conn *e, const uint8_t *rec, uint64_t offset_ns, char *o)
{
	const struct layout *L = &c->lay;
	uint64_t ts = rd64(rec + L->ts_off) + offset_ns;
	uint64_t length = rd64(rec + L->length_off), offset = rd64(rec + L->offset_off);
	uint32_t chunk = rd32(rec + L->chunk_off);
	uint8_t truncated = rec[L->trunc_off];
	const uint8_t *data = rec + L->data_off;

	if (L->text) {
		if (offset || chunk != length || chunk > L->plain_limit || truncated)
			return NULL;
		if (!all_ascii(data, chunk) && valid_utf8(data, chunk))
			return NULL; /* text with non-ASCII characters: Python's isprintable() decides */
	}
	int64_t sec = (int64_t)(ts / 1000000000u);
	uint32_t micros = (uint32_t)(ts % 1000000000u / 1000u);
	if (sec != c->sec) {
		time_t t = (time_t)sec;
		struct tm tm;
		if (!gmtime_r(&t, &tm))
			return NULL;
		c->prefix_len = (uint32_t)strftime(c->prefix, sizeof(c->prefix), "%Y-%m-%dT%H:%M:%S", &tm);
		if (!c->prefix_len)
			return NULL;
		c->sec = sec;
	}
	const uint8_t *r = e->recipe, *end = e->recipe + e->recipe_len;
	while (r < end) {
		switch (*r++) {
		case SLOT_END:
			return o;
		case SLOT_LITERAL: {
			uint32_t n = rd32(r);
			memcpy(o, r + 4, n);
			o += n;
			r += 4 + n;
			break;
		}
		case SLOT_PREFIX:
			memcpy(o, c->prefix, c->prefix_len);
			o += c->prefix_len;
			break;
		case SLOT_MICROS:
			for (int k = 5; k >= 0; k--) {
				o[k] = (char)('0' + micros % 10);
				micros /= 10;
			}
			o += 6;
			break;
		case SLOT_LENGTH:
			o = decimal(o, length);
			break;
		case SLOT_OFFSET:
			o = decimal(o, offset);
			break;
		case SLOT_TRUNCATED:
			memcpy(o, truncated ? "true" : "false", truncated ? 4 : 5);
			o += truncated ? 4 : 5;
			break;
		case SLOT_BASE64:
			o = base64(o, data, chunk);
			break;
		case SLOT_TEXT_BODY: /* "\n" + the payload with control bytes as '.', when there is one */
			if (chunk) {
				*o++ = '\n';
				for (uint32_t i = 0; i < chunk; i++)
					o[i] = (char)L->printable[data[i]];
				o += chunk;
			}
			break;
		default:
			return NULL;
		}
	}
	return o;
}

/* Records from cons up to prod (re-read as the loop goes), formatted into out (out_cap bytes).
 * data: the ring's data area (size = mask + 1), prod_ptr: the kernel's producer position. */
int ct_fmt_run(struct ctx *c, const uint8_t *data, uint64_t mask, const volatile uint64_t *prod_ptr,
	       uint64_t cons, uint64_t offset_ns, char *out, uint64_t out_cap, struct result *res)
{
	const struct layout *L = &c->lay;
	uint64_t prod = *prod_ptr;
	char *o = out, *o_end = out + out_cap;
	int stop = STOP_EMPTY;
	uint8_t key[2 * KEY_MAX];
	uint32_t klen = (L->key1 - L->key0) + (L->key3 - L->key2);

	res->records = res->written = 0;
	for (;;) {
		if (cons >= prod) {
			prod = *prod_ptr;
			if (cons >= prod)
				break;
		}
		uint64_t pos = cons & mask;
		uint32_t header = __atomic_load_n((const uint32_t *)(data + pos), __ATOMIC_ACQUIRE);
		if (header & BUSY_BIT)
			break; /* reserved, not committed yet: in order, so the end for now */
		uint32_t size = header & ~(BUSY_BIT | DISCARD_BIT);
		uint64_t next = cons + ((size + HEADER_SIZE + 7) & ~7u);
		if (header & DISCARD_BIT) {
			cons = next;
			continue;
		}
		if (pos + HEADER_SIZE + size > mask + 1 || size < L->data_off || klen > KEY_MAX ||
		    rd32(data + pos + HEADER_SIZE + L->type_off) != L->data_type) {
			stop = STOP_PYTHON; /* wraps, or not a data record */
			break;
		}
		const uint8_t *rec = data + pos + HEADER_SIZE;
		memcpy(key, rec + L->key0, L->key1 - L->key0);
		memcpy(key + (L->key1 - L->key0), rec + L->key2, L->key3 - L->key2);
		int found;
		struct conn *e = find(c, key, klen, &found);
		if (!found) {
			stop = STOP_PYTHON;
			break;
		}
		if (!e->skip) {
			uint32_t chunk = rd32(rec + L->chunk_off);
			if (L->data_off + (uint64_t)chunk > size) {
				stop = STOP_PYTHON;
				break;
			}
			if ((uint64_t)(o_end - o) < bound(e, chunk)) {
				stop = o == out ? STOP_PYTHON : STOP_FULL;
				break;
			}
			char *after = format(c, e, rec, offset_ns, o);
			if (!after) {
				stop = STOP_PYTHON;
				break;
			}
			o = after;
			res->written++;
		}
		res->records++;
		cons = next;
	}
	res->cons = cons;
	res->out_len = (uint64_t)(o - out);
	return stop;
}
