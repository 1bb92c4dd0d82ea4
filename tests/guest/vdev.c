/*
 * The block, entropy and network actions of the command line, on top of the
 * polling core in virtio.c.  Devices are found and initialised on first use.
 *
 *   blk=write:<sector>:<pattern>:<count>   blk=read:<sector>:<count>
 *   blk=flush   blk=id   blkdev=<n> (use the n-th block device from now on)
 *   rng=<nbytes>   net=send:<hex frame>   net=recv
 *
 * Every request prints one line with the device's status, e.g.
 *   testguest: blk read sector=0 count=8 status=0 crc=0x1234abcd first=0xab uniform=1
 * A status of 255 means the device returned the chain without writing it.
 */
#include "virtio.h"

/* virtio-blk (5.2; the request types are in virtio.h) */
#define VIRTIO_BLK_ID_BYTES     20
#define BLK_MAX_SECTORS         128     /* per request: the size of iobuf */
/* virtio-net (5.1) */
#define VIRTIO_NET_F_MAC        (1ull << 5)
#define VIRTIO_NET_HDR_LEN      12      /* struct virtio_net_hdr_v1 */
#define NET_RX_QUEUE            0
#define NET_TX_QUEUE            1
#define NET_MAX_FRAME           65550

static struct virtio_params params;
static uint64_t blk_index;
static struct vdev blk_dev, rng_dev, net_dev;
static struct virtq blk_q, rng_q, net_q[2];
/* How blk_dev was last initialised; another mode re-initialises it. */
static struct { uint16_t qsize; uint64_t features; } blk_mode;
static struct virtio_blk_req_hdr blk_hdr;
static volatile uint8_t blk_status;
static uint8_t iobuf[BLK_MAX_SECTORS * SECTOR_SIZE] __attribute__((aligned(4096)));
static uint8_t net_rx[VIRTIO_NET_HDR_LEN + NET_MAX_FRAME] __attribute__((aligned(4096)));
static uint8_t net_tx[VIRTIO_NET_HDR_LEN + 2048] __attribute__((aligned(64)));

void vdev_configure(const struct virtio_params *p)
{
        params = *p;
}

static int ensure(struct vdev *d, uint32_t id, uint64_t nth, uint64_t wanted,
                  struct virtq *qs, int nq, uint16_t qsize, const char *what)
{
        if (d->ready)
                return 0;
        if (virtio_find(&params, id, nth, d) < 0) {
                con_begin(what);
                con_puts(" error=no-device");
                con_end();
                return -1;
        }
        return virtio_init(d, wanted, qs, nq, qsize);
}

/* ---- block ---- */

void blk_select(uint64_t index)
{
        if (index != blk_index)
                blk_dev.ready = 0;      /* the next action finds and resets it */
        blk_index = index;
}

static int blk_request(uint32_t type, uint64_t sector, void *data, uint32_t len)
{
        struct vbuf b[3];
        int n = 0;
        uint32_t used;

        blk_hdr.type = type;
        blk_hdr.reserved = 0;
        blk_hdr.sector = sector;
        blk_status = 0xff;
        b[n++] = (struct vbuf){&blk_hdr, sizeof(blk_hdr), 0};
        if (len)
                b[n++] = (struct vbuf){data, len, type != VIRTIO_BLK_T_OUT};
        b[n++] = (struct vbuf){&blk_status, 1, 1};
        vq_add(&blk_q, b, n);
        vq_notify(&blk_q);
        if (vq_wait(&blk_q, &used) < 0)
                return -1;
        return blk_status;
}

static void blk_rw(int write, uint64_t sector, uint64_t count, uint8_t pattern)
{
        while (count) {
                uint64_t c = count < BLK_MAX_SECTORS ? count : BLK_MAX_SECTORS;
                uint32_t len = (uint32_t)(c * SECTOR_SIZE);
                int st;

                if (write)
                        memset(iobuf, pattern, len);
                else
                        memset(iobuf, 0, len);
                st = blk_request(write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector, iobuf, len);
                con_begin(write ? "blk write" : "blk read");
                con_kv("sector", sector);
                con_kv("count", c);
                if (write)
                        con_kvx("pattern", pattern);
                con_kv("status", (uint64_t)(st < 0 ? 256 : st));
                if (!write) {
                        int uniform = 1;

                        for (uint32_t i = 1; i < len; i++)
                                uniform &= iobuf[i] == iobuf[0];
                        con_puts(" crc=");
                        con_hex32(crc32_update(0, iobuf, len));
                        con_kvx("first", iobuf[0]);
                        con_kv("uniform", (uint64_t)uniform);
                }
                con_end();
                sector += c;
                count -= c;
        }
}

static void blk_get_id(void)
{
        int st;

        memset(iobuf, 0, VIRTIO_BLK_ID_BYTES);
        st = blk_request(VIRTIO_BLK_T_GET_ID, 0, iobuf, VIRTIO_BLK_ID_BYTES);
        con_begin("blk id");
        con_kv("status", (uint64_t)(st < 0 ? 256 : st));
        con_puts(" serial=");
        for (int i = 0; i < VIRTIO_BLK_ID_BYTES && iobuf[i]; i++)
                con_putc(iobuf[i] > ' ' && iobuf[i] < 0x7f ? (char)iobuf[i] : '.');
        con_end();
}

/* The block device initialised with queue size qsize and the extra feature
 * bits (beyond RO and FLUSH) the caller wants; a different mode than the
 * last one resets and re-initialises it (3.1.1 starts with a reset). */
static int blk_ready_mode(uint16_t qsize, uint64_t extra)
{
        if (blk_dev.ready && blk_mode.qsize == qsize && blk_mode.features == extra)
                return 0;
        blk_dev.ready = 0;
        if (ensure(&blk_dev, VIRTIO_ID_BLOCK, blk_index, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH | extra,
                   &blk_q, 1, qsize, "blk") < 0)
                return -1;
        blk_mode.qsize = qsize;
        blk_mode.features = extra;
        con_begin("blk device");
        con_kv("index", blk_index);
        con_kv("capacity", blk_capacity());
        con_kv("ro", !!(blk_dev.features & VIRTIO_BLK_F_RO));
        con_kv("flush", !!(blk_dev.features & VIRTIO_BLK_F_FLUSH));
        con_end();
        return 0;
}

static int blk_ready(void)
{
        return blk_ready_mode(VQ_DEFAULT_SIZE, 0);
}

uint64_t blk_capacity(void)
{
        return (uint64_t)virtio_config32(&blk_dev, 4) << 32 | virtio_config32(&blk_dev, 0);
}

void blk_forget(void)
{
        blk_dev.ready = 0;
}

struct virtq *blk_open_queue(uint16_t qsize, uint64_t extra_features)
{
        return blk_ready_mode(qsize, extra_features) < 0 ? 0 : &blk_q;
}

void blk_action(const char *arg, size_t n)
{
        const char *f[4];
        size_t fl[4];
        uint64_t v[3] = {0, 0, 0};
        int k = split_fields(arg, n, f, fl, 4);

        for (int i = 1; i < k; i++)
                if (parse_u64(f[i], fl[i], &v[i - 1]) < 0)
                        goto bad;
        if (blk_ready() < 0)
                return;
        if (k == 4 && word_is(f[0], fl[0], "write") && v[1] <= 0xff)
                blk_rw(1, v[0], v[2], (uint8_t)v[1]);
        else if (k == 3 && word_is(f[0], fl[0], "read"))
                blk_rw(0, v[0], v[1], 0);
        else if (k == 1 && word_is(f[0], fl[0], "flush")) {
                int st = blk_request(VIRTIO_BLK_T_FLUSH, 0, 0, 0);

                con_begin("blk flush");
                con_kv("status", (uint64_t)(st < 0 ? 256 : st));
                con_end();
        } else if (k == 1 && word_is(f[0], fl[0], "id"))
                blk_get_id();
        else
                goto bad;
        return;
bad:
        con_begin("blk error=bad-argument arg=");
        con_write(arg, n);
        con_end();
}

/* ---- entropy ---- */

void rng_action(const char *arg, size_t n)
{
        uint64_t want;
        uint32_t got;
        struct vbuf b;

        if (parse_u64(arg, n, &want) < 0 || want == 0 || want > sizeof(iobuf)) {
                con_begin("rng error=bad-argument arg=");
                con_write(arg, n);
                con_end();
                return;
        }
        if (ensure(&rng_dev, VIRTIO_ID_RNG, 0, 0, &rng_q, 1, VQ_DEFAULT_SIZE, "rng") < 0)
                return;
        memset(iobuf, 0, want);
        b = (struct vbuf){iobuf, (uint32_t)want, 1};
        vq_add(&rng_q, &b, 1);
        vq_notify(&rng_q);
        if (vq_wait(&rng_q, &got) < 0)
                return;
        con_begin("rng");
        con_kv("requested", want);
        con_kv("bytes", got);
        con_puts(" hex=");
        con_bytes_hex(iobuf, got < 16 ? got : 16);
        con_end();
}

/* ---- network ---- */

static void net_post_rx(void)
{
        struct vbuf b = {net_rx, sizeof(net_rx), 1};

        vq_add(&net_q[NET_RX_QUEUE], &b, 1);
        vq_notify(&net_q[NET_RX_QUEUE]);
}

static int net_ready(void)
{
        if (net_dev.ready)
                return 0;
        if (ensure(&net_dev, VIRTIO_ID_NET, 0, VIRTIO_NET_F_MAC, net_q, 2, VQ_DEFAULT_SIZE, "net") < 0)
                return -1;
        con_begin("net device mac=");
        if (net_dev.features & VIRTIO_NET_F_MAC)
                for (uint32_t i = 0; i < 6; i++) {
                        uint8_t m = virtio_config8(&net_dev, i);

                        con_bytes_hex(&m, 1);
                }
        else
                con_puts("none");
        con_end();
        net_post_rx();  /* so frames that arrive early are kept */
        return 0;
}

static int hex_nibble(char c)
{
        uint64_t v;

        return parse_u64((const char[]){'0', 'x', c}, 3, &v) < 0 ? -1 : (int)v;
}

static int parse_hex_frame(const char *s, size_t n, uint8_t *out, size_t max)
{
        if (n == 0 || n % 2 || n / 2 > max)
                return -1;
        for (size_t i = 0; i < n; i += 2) {
                int hi = hex_nibble(s[i]), lo = hex_nibble(s[i + 1]);

                if (hi < 0 || lo < 0)
                        return -1;
                out[i / 2] = (uint8_t)(hi << 4 | lo);
        }
        return (int)(n / 2);
}

static void net_send(const char *hex, size_t n)
{
        int len = parse_hex_frame(hex, n, net_tx + VIRTIO_NET_HDR_LEN,
                                  sizeof(net_tx) - VIRTIO_NET_HDR_LEN);
        struct vbuf b;
        uint32_t used;

        if (len < 0) {
                con_line("net error=bad-frame");
                return;
        }
        memset(net_tx, 0, VIRTIO_NET_HDR_LEN);  /* no offloads, GSO_NONE */
        b = (struct vbuf){net_tx, (uint32_t)(VIRTIO_NET_HDR_LEN + len), 0};
        vq_add(&net_q[NET_TX_QUEUE], &b, 1);
        vq_notify(&net_q[NET_TX_QUEUE]);
        if (vq_wait(&net_q[NET_TX_QUEUE], &used) < 0)
                return;
        con_begin("net send");
        con_kv("len", (uint64_t)len);
        con_end();
}

static void net_recv(void)
{
        uint32_t used;

        if (vq_wait(&net_q[NET_RX_QUEUE], &used) < 0)
                return;
        if (used < VIRTIO_NET_HDR_LEN || used > sizeof(net_rx)) {
                con_begin("net recv error=bad-length");
                con_kv("used", used);
                con_end();
        } else {
                con_begin("net recv");
                con_kv("len", used - VIRTIO_NET_HDR_LEN);
                con_puts(" frame=");
                con_bytes_hex(net_rx + VIRTIO_NET_HDR_LEN, used - VIRTIO_NET_HDR_LEN);
                con_end();
        }
        net_post_rx();
}

void net_action(const char *arg, size_t n)
{
        if (net_ready() < 0)
                return;
        if (n > 5 && memcmp(arg, "send:", 5) == 0)
                net_send(arg + 5, n - 5);
        else if (word_is(arg, n, "recv"))
                net_recv();
        else {
                con_begin("net error=bad-argument arg=");
                con_write(arg, n);
                con_end();
        }
}
