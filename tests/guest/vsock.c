/*
 * A polling virtio-vsock driver (virtio 1.2, 5.10) for the kvm tier: one
 * stream connection at a time, both directions, with credit-based flow
 * control as the spec asks of a driver.
 *
 *   vsock=connect:<host port>:<bytes>   the guest connects to the host (CID 2)
 *   vsock=accept:<guest port>:<bytes>   the guest waits for a host connection
 *
 * Either way, once connected the guest sends <bytes> of the pattern
 * vsock_pattern(i) and receives <bytes>, then shuts down both ways and waits
 * for the device's RST.  It prints
 *   testguest: vsock device cid=3
 *   testguest: vsock listen port=P                       (accept, when ready)
 *   testguest: vsock connect port=P result=ok sent=N received=N crc=0x.. closed=1
 * with result=reset (the host refused), result=timeout, or result=broken
 * (the device asked for a reset).  crc is zlib.crc32 of the received bytes.
 *
 * Eight 4 KiB receive buffers stay posted on the RX queue; the event queue
 * gets one buffer so a transport reset could be seen (it is reported as
 * result=reset if it comes mid-stream).
 */
#include "virtio.h"

#define VIRTIO_ID_VSOCK         19
#define VSOCK_RXQ               0
#define VSOCK_TXQ               1
#define VSOCK_EVQ               2
#define HOST_CID                2
#define TYPE_STREAM             1
#define OP_REQUEST              1
#define OP_RESPONSE             2
#define OP_RST                  3
#define OP_SHUTDOWN             4
#define OP_RW                   5
#define OP_CREDIT_UPDATE        6
#define OP_CREDIT_REQUEST       7
#define SHUTDOWN_BOTH           3
#define NRX                     8
#define PAYLOAD                 4096
#define GUEST_BUF_ALLOC         (64u * 1024)
/* rdtsc ticks before giving up on the host (some seconds at any clock rate). */
#define DEADLINE_TICKS          (60ull * 1000 * 1000 * 1000)

struct vsock_hdr {
        uint64_t src_cid;
        uint64_t dst_cid;
        uint32_t src_port;
        uint32_t dst_port;
        uint32_t len;
        uint16_t type;
        uint16_t op;
        uint32_t flags;
        uint32_t buf_alloc;
        uint32_t fwd_cnt;
} __attribute__((packed));

#define HDR ((uint32_t)sizeof(struct vsock_hdr))

static struct virtio_params params;
static struct vdev dev;
static struct virtq q[3];
static uint8_t rxbuf[NRX][sizeof(struct vsock_hdr) + PAYLOAD] __attribute__((aligned(64)));
static uint8_t txbuf[sizeof(struct vsock_hdr) + PAYLOAD] __attribute__((aligned(64)));
static uint32_t evbuf;
static uint64_t cid;
static uint32_t next_port = 1024;

/* One connection: our port, the host's, and both credit ledgers. */
static struct {
        uint32_t lport, pport;
        uint32_t fwd_cnt, last_fwd_sent;                /* what we consumed, and told */
        uint32_t tx_cnt, peer_buf_alloc, peer_fwd_cnt;  /* what we sent, the host's room */
        int host_shut;
} c;

void vsock_configure(const struct virtio_params *p)
{
        params = *p;
}

static uint8_t vsock_pattern(uint64_t i)
{
        return (uint8_t)(i * 31 + (i >> 9) + 7);
}

static void post_rx(uint16_t head)
{
        struct vbuf b = {rxbuf[head], sizeof(rxbuf[head]), 1};
        uint16_t old;

        vq_add_chain(&q[VSOCK_RXQ], head, &b, 1);
        old = vq_publish(&q[VSOCK_RXQ]);
        vq_kick(&q[VSOCK_RXQ], old);
}

static int ready(void)
{
        struct vbuf b = {&evbuf, sizeof(evbuf), 1};
        uint16_t old;

        if (dev.ready)
                return 0;
        if (virtio_find(&params, VIRTIO_ID_VSOCK, 0, &dev) < 0) {
                con_line("vsock error=no-device");
                return -1;
        }
        if (virtio_init(&dev, 0, q, 3, VQ_DEFAULT_SIZE) < 0)
                return -1;
        cid = (uint64_t)virtio_config32(&dev, 4) << 32 | virtio_config32(&dev, 0);
        for (uint16_t i = 0; i < NRX; i++)
                post_rx(i);
        vq_add_chain(&q[VSOCK_EVQ], 0, &b, 1);
        old = vq_publish(&q[VSOCK_EVQ]);
        vq_kick(&q[VSOCK_EVQ], old);
        con_begin("vsock device");
        con_kv("cid", cid);
        con_end();
        return 0;
}

static int send(uint16_t op, uint32_t len, uint32_t flags)
{
        struct vsock_hdr *h = (struct vsock_hdr *)txbuf;
        struct vbuf b = {txbuf, HDR + len, 0};
        uint32_t used;

        h->src_cid = cid;
        h->dst_cid = HOST_CID;
        h->src_port = c.lport;
        h->dst_port = c.pport;
        h->len = len;
        h->type = TYPE_STREAM;
        h->op = op;
        h->flags = flags;
        h->buf_alloc = GUEST_BUF_ALLOC;
        h->fwd_cnt = c.fwd_cnt;
        c.last_fwd_sent = c.fwd_cnt;
        vq_add(&q[VSOCK_TXQ], &b, 1);
        vq_notify(&q[VSOCK_TXQ]);
        return vq_wait(&q[VSOCK_TXQ], &used);
}

/* Takes one received packet: 1 with its header (and payload in rxbuf[*head]), else 0. */
static int recv(struct vsock_hdr *h, uint16_t *head)
{
        uint32_t id, len;

        if (!vq_poll_used(&q[VSOCK_RXQ], &id, &len))
                return 0;
        if (id >= NRX || len < HDR) {
                memset(h, 0, sizeof(*h));
        } else {
                memcpy(h, rxbuf[id], HDR);
        }
        *head = (uint16_t)id;
        return 1;
}

static int ours(const struct vsock_hdr *h)
{
        return h->src_cid == HOST_CID && h->dst_cid == cid && h->src_port == c.pport &&
               h->dst_port == c.lport && h->type == TYPE_STREAM;
}

enum { OK = 0, RESET = -1, TIMEOUT = -2, BROKEN = -3 };

/* Handles one packet of our connection that is not data; RESET on RST. */
static int control(const struct vsock_hdr *h)
{
        c.peer_buf_alloc = h->buf_alloc;
        c.peer_fwd_cnt = h->fwd_cnt;
        if (h->op == OP_RST)
                return RESET;
        if (h->op == OP_SHUTDOWN)
                c.host_shut = 1;
        if (h->op == OP_CREDIT_REQUEST && send(OP_CREDIT_UPDATE, 0, 0) < 0)
                return BROKEN;
        return OK;
}

/* Waits for a packet of our connection with operation op (or RST). */
static int wait_op(uint16_t op, struct vsock_hdr *out, int any_source)
{
        uint64_t deadline = rdtsc() + DEADLINE_TICKS;
        uint16_t head;

        while (rdtsc() < deadline) {
                if (!recv(out, &head)) {
                        cpu_relax();
                        continue;
                }
                post_rx(head);
                if (any_source ? out->op != op : !ours(out))
                        continue;
                if (out->op == op)
                        return OK;
                if (control(out) == RESET)
                        return RESET;
        }
        return TIMEOUT;
}

static int exchange(uint64_t n, uint64_t *sent_out, uint64_t *got_out, uint32_t *crc_out)
{
        uint64_t deadline = rdtsc() + DEADLINE_TICKS, sent = 0, got = 0;
        uint32_t crc = 0;
        struct vsock_hdr h;
        uint16_t head;
        int r = OK;

        while ((sent < n || got < n) && r == OK) {
                uint32_t credit = c.peer_buf_alloc - (c.tx_cnt - c.peer_fwd_cnt);
                int idle = 1;

                if (rdtsc() > deadline) {
                        r = TIMEOUT;
                        break;
                }
                if (sent < n && credit && credit <= c.peer_buf_alloc) {
                        uint32_t chunk = credit < PAYLOAD ? credit : PAYLOAD;

                        if (chunk > n - sent)
                                chunk = (uint32_t)(n - sent);
                        for (uint32_t i = 0; i < chunk; i++)
                                txbuf[HDR + i] = vsock_pattern(sent + i);
                        if (send(OP_RW, chunk, 0) < 0)
                                r = BROKEN;
                        sent += chunk;
                        c.tx_cnt += chunk;
                        idle = 0;
                }
                while (r == OK && recv(&h, &head)) {
                        idle = 0;
                        if (ours(&h) && h.op == OP_RW && h.len <= PAYLOAD) {
                                crc = crc32_update(crc, rxbuf[head] + HDR, h.len);
                                got += h.len;
                                c.fwd_cnt += h.len;
                                c.peer_buf_alloc = h.buf_alloc;
                                c.peer_fwd_cnt = h.fwd_cnt;
                        } else if (ours(&h)) {
                                r = control(&h);
                        }
                        post_rx(head);
                }
                /* Tell the host what we consumed before it runs out of room. */
                if (r == OK && c.fwd_cnt - c.last_fwd_sent >= GUEST_BUF_ALLOC / 2 &&
                    send(OP_CREDIT_UPDATE, 0, 0) < 0)
                        r = BROKEN;
                if (idle)
                        cpu_relax();
        }
        *sent_out = sent;
        *got_out = got;
        *crc_out = crc;
        return r;
}

static void report(const char *what, uint32_t port, int r, uint64_t sent, uint64_t got,
                   uint32_t crc, int closed)
{
        con_begin(what);
        con_kv("port", port);
        con_puts(r == OK ? " result=ok" : r == RESET ? " result=reset" :
                 r == TIMEOUT ? " result=timeout" : " result=broken");
        con_kv("sent", sent);
        con_kv("received", got);
        con_puts(" crc=");
        con_hex32(crc);
        con_kv("closed", (uint64_t)closed);
        con_end();
}

static void run(int accept, uint32_t port, uint64_t n)
{
        struct vsock_hdr h;
        uint64_t sent = 0, got = 0;
        uint32_t crc = 0;
        int r, closed = 0;

        memset(&c, 0, sizeof(c));
        if (accept) {
                con_begin("vsock listen");
                con_kv("port", port);
                con_end();
                do
                        r = wait_op(OP_REQUEST, &h, 1);
                while (r == OK && (h.dst_port != port || h.src_cid != HOST_CID));
                c.lport = port;
                c.pport = h.src_port;
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                if (r == OK && send(OP_RESPONSE, 0, 0) < 0)
                        r = BROKEN;
        } else {
                c.lport = next_port++;
                c.pport = port;
                r = send(OP_REQUEST, 0, 0) < 0 ? BROKEN : wait_op(OP_RESPONSE, &h, 0);
                if (r == OK) {
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                }
        }
        if (r == OK)
                r = exchange(n, &sent, &got, &crc);
        if (r == OK) {
                /* Done both ways: the device answers a full shutdown with RST. */
                if (send(OP_SHUTDOWN, 0, SHUTDOWN_BOTH) < 0)
                        r = BROKEN;
                else
                        closed = wait_op(OP_RST, &h, 0) == OK;
        }
        report(accept ? "vsock accept" : "vsock connect", port, r, sent, got, crc, closed);
}

void vsock_action(const char *arg, size_t n)
{
        const char *f[3];
        size_t fl[3];
        uint64_t port, bytes;
        int k = split_fields(arg, n, f, fl, 3);

        if (k != 3 || parse_u64(f[1], fl[1], &port) < 0 || port > 0xffffffffull ||
            parse_u64(f[2], fl[2], &bytes) < 0 ||
            !(word_is(f[0], fl[0], "connect") || word_is(f[0], fl[0], "accept"))) {
                con_begin("vsock error=bad-argument arg=");
                con_write(arg, n);
                con_end();
                return;
        }
        if (ready() < 0)
                return;
        run(word_is(f[0], fl[0], "accept"), (uint32_t)port, bytes);
}
