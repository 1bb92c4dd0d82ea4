/*
 * blkbench: a read benchmark on the selected virtio-blk device that keeps
 * several requests in flight, for benchmarks/block.py.
 *
 *   blkbench=randread:<block_bytes>:<count>:<depth>
 *   blkbench=seqread:<block_bytes>:<total_bytes>:<depth>
 *   ...:ack   (a fifth field) after each batch of completions, read
 *             InterruptStatus and write InterruptACK if a bit is set, as
 *             Linux's virtio-mmio interrupt handler does: two VM exits per
 *             interrupt, for measuring what they cost.  Over virtio-pci
 *             (pci-blkbench=, pci.c) it reads the ISR byte instead, as an
 *             INTx handler does: one exit.
 *
 * The loop is the same over both transports; struct blkbench_transport
 * (virtio.h) supplies the device: virtio-mmio here (blkbench=, the device
 * blkdev= selected), virtio-pci in pci.c (pci-blkbench=).
 *
 * randread issues <count> reads of <block_bytes> at block-aligned offsets
 * drawn from xorshift64 (13, 7, 17) seeded with BENCH_SEED, so every run,
 * under every VMM, reads the same offsets in the same order:
 *     x ^= x << 13; x ^= x >> 7; x ^= x << 17; block index = x % blocks
 * where blocks = capacity * 512 / block_bytes.  seqread reads
 * <total_bytes> / <block_bytes> blocks from offset 0 upwards, wrapping to 0
 * at the last whole block.  <depth> (1..64) requests stay in flight: each
 * has its own three descriptors (header, data, status) at head 3*slot, and
 * its own data buffer at BENCH_BUF_BASE + slot * block_bytes (guest RAM must
 * reach that far: 16 MiB + depth * block_bytes, at most 80 MiB).
 *
 * Each run resets the device and sets up its queue afresh, with
 * BENCH_QUEUE_SIZE entries (or QueueNumMax if smaller) and
 * VIRTIO_RING_F_EVENT_IDX if offered, as Linux would: every
 * completion re-arms used_event (the guest asks for an interrupt per batch,
 * though it polls with interrupts masked), and a kick is sent only when the
 * device's avail_event asks for it.  Completions are polled; each batch of
 * them is refilled and published with one kick.
 *
 * Output (the host times the I/O between the end of the first line and the
 * first byte of the second):
 *   testguest: blkbench start mode=randread block=4096 ops=N depth=D queue_size=256 event_idx=1 blocks=B
 *   testguest: blkbench done mode=randread ops=N bytes=B errors=E tsc=T check=0x... glitches=G
 * tsc is the rdtsc delta around the I/O.  check is the sum (mod 2^64) of the
 * first 8 bytes (little-endian) of every block read with status OK: the host
 * computes the same sum from the file to prove the right data arrived.
 * errors counts requests whose status byte was not VIRTIO_BLK_S_OK;
 * glitches counts impossible used->idx values seen (see reap()).
 */
#include "virtio.h"

#define BENCH_BUF_BASE          0x1000000ull    /* 16 MiB: above the image and boot data */
#define BENCH_BUF_BYTES         (64ull << 20)
#define BENCH_MAX_DEPTH         64
#define BENCH_QUEUE_SIZE        256
#define DESCS_PER_REQUEST       3
#define BENCH_SEED              0x9e3779b97f4a7c15ull
#define STALL_CHECK_SPINS       (1u << 22)      /* empty polls between DEVICE_NEEDS_RESET checks */

struct bench {
        const char *mode;
        int random, ack;
        uint64_t block, ops, depth, blocks;
        uint64_t issued, completed, errors, check, glitches;
        uint64_t next_seq, rng;
};

static struct virtio_blk_req_hdr hdr[BENCH_MAX_DEPTH];
static volatile uint8_t status[BENCH_MAX_DEPTH];
static uint8_t busy[BENCH_MAX_DEPTH];

static volatile uint8_t *slot_buf(const struct bench *b, uint64_t slot)
{
        return phys(BENCH_BUF_BASE + slot * b->block);
}

static uint64_t next_block(struct bench *b)
{
        if (b->random) {
                uint64_t x = b->rng;

                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b->rng = x;
                return x % b->blocks;
        }
        uint64_t n = b->next_seq;

        b->next_seq = n + 1 == b->blocks ? 0 : n + 1;
        return n;
}

static void issue(struct virtq *q, struct bench *b, uint64_t slot)
{
        volatile uint8_t *buf = slot_buf(b, slot);
        struct vbuf v[DESCS_PER_REQUEST];

        hdr[slot].type = VIRTIO_BLK_T_IN;
        hdr[slot].reserved = 0;
        hdr[slot].sector = next_block(b) * (b->block / SECTOR_SIZE);
        status[slot] = 0xff;
        *(volatile uint64_t *)buf = 0;  /* a read that wrote nothing shows in check= */
        v[0] = (struct vbuf){&hdr[slot], sizeof(hdr[slot]), 0};
        v[1] = (struct vbuf){buf, (uint32_t)b->block, 1};
        v[2] = (struct vbuf){&status[slot], 1, 1};
        vq_add_chain(q, (uint16_t)(slot * DESCS_PER_REQUEST), v, DESCS_PER_REQUEST);
        busy[slot] = 1;
        b->issued++;
}

static void kick(const struct blkbench_transport *t, struct virtq *q, uint16_t old)
{
        if (vq_kick_wanted(q, old))
                t->notify(q);
}

static void fail(const char *why, const char *key, uint64_t value)
{
        con_begin("blkbench error=");
        con_puts(why);
        if (key)
                con_kv(key, value);
        con_end();
}

/* Takes every completion there is, refills its slot, publishes once.
 * Returns 1 if anything completed, 0 if nothing, -1 on a bad used id.
 *
 * A used->idx further ahead than the requests in flight cannot be a real
 * index: it is a device caught writing the field non-atomically (e.g. in two
 * steps through zero).  It is counted in glitches= and read again, instead of
 * taking stale ring entries for completions.  A zero is recognisable while
 * the queue has completed fewer than 65536 - depth requests; every run
 * starts on a fresh queue, and a stale entry taken later still fails the
 * id check or the host's check= comparison. */
static int reap(const struct blkbench_transport *t, struct virtq *q, struct bench *b)
{
        uint16_t ready = vq_used_ready(q);
        uint32_t id, len;
        int added = 0;

        if (ready == 0)
                return 0;
        if (ready > b->issued - b->completed) {
                b->glitches++;
                return 0;
        }
        for (uint16_t i = 0; i < ready; i++) {
                uint64_t slot;

                vq_take_used(q, &id, &len);
                slot = id / DESCS_PER_REQUEST;
                if (id % DESCS_PER_REQUEST || slot >= b->depth || !busy[slot]) {
                        con_begin("blkbench error=bad-used-id");
                        con_kv("id", id);
                        con_kv("completed", b->completed);
                        con_kv("issued", b->issued);
                        con_end();
                        return -1;
                }
                busy[slot] = 0;
                b->completed++;
                if (status[slot] == 0)
                        b->check += *(volatile uint64_t *)slot_buf(b, slot);
                else
                        b->errors++;
                if (b->issued < b->ops) {
                        issue(q, b, slot);
                        added = 1;
                }
        }
        if (added)
                kick(t, q, vq_publish(q));
        if (b->ack)
                t->ack_interrupt(q);
        return 1;
}

static int run(const struct blkbench_transport *t, struct virtq *q, struct bench *b)
{
        uint32_t spins = 0;

        for (uint64_t slot = 0; slot < b->depth && b->issued < b->ops; slot++)
                issue(q, b, slot);
        kick(t, q, vq_publish(q));
        while (b->completed < b->ops) {
                int got = reap(t, q, b);

                if (got < 0)
                        return -1;
                if (got) {
                        spins = 0;
                        continue;
                }
                cpu_relax();
                /* Rarely (each read is a VM exit) check the device is alive. */
                if (++spins % STALL_CHECK_SPINS == 0 && t->device_broken(q)) {
                        fail("DEVICE_NEEDS_RESET", 0, 0);
                        return -1;
                }
        }
        return 0;
}

static void line_start(const char *event, const struct bench *b)
{
        con_begin(event);
        con_puts(" mode=");
        con_puts(b->mode);
}

static int parse(const char *arg, size_t n, struct bench *b)
{
        const char *f[5];
        size_t fl[5];
        uint64_t v[3];
        int k = split_fields(arg, n, f, fl, 5);

        if (k == 5 && word_is(f[4], fl[4], "ack"))
                b->ack = 1;
        else if (k != 4)
                return -1;
        for (int i = 1; i < 4; i++)
                if (parse_u64(f[i], fl[i], &v[i - 1]) < 0)
                        return -1;
        b->block = v[0];
        b->depth = v[2];
        if (b->block == 0 || b->block % SECTOR_SIZE || b->depth == 0 || b->depth > BENCH_MAX_DEPTH ||
            b->block > BENCH_BUF_BYTES / b->depth)
                return -1;
        if (word_is(f[0], fl[0], "randread")) {
                b->mode = "randread";
                b->random = 1;
                b->ops = v[1];
        } else if (word_is(f[0], fl[0], "seqread") && v[1] % b->block == 0) {
                b->mode = "seqread";
                b->ops = v[1] / b->block;
        } else {
                return -1;
        }
        return b->ops ? 0 : -1;
}

void blkbench_run(const struct blkbench_transport *t, const char *arg, size_t n)
{
        struct bench b = {0};
        struct virtq *q;
        uint64_t t0, t1;

        if (parse(arg, n, &b) < 0) {
                con_begin("blkbench error=bad-argument arg=");
                con_write(arg, n);
                con_end();
                return;
        }
        q = t->open_queue(BENCH_QUEUE_SIZE, VIRTIO_RING_F_EVENT_IDX);  /* indices from 0, see reap() */
        if (!q)
                return;
        if (q->size < b.depth * DESCS_PER_REQUEST) {
                fail("queue-too-small", "queue_size", q->size);
                return;
        }
        b.blocks = t->capacity() * SECTOR_SIZE / b.block;
        if (b.blocks == 0) {
                fail("device-too-small", "capacity", t->capacity());
                return;
        }
        b.rng = BENCH_SEED;
        line_start("blkbench start", &b);
        con_kv("block", b.block);
        con_kv("ops", b.ops);
        con_kv("depth", b.depth);
        con_kv("queue_size", q->size);
        con_kv("event_idx", (uint64_t)q->event_idx);
        con_kv("blocks", b.blocks);
        con_end();
        t0 = rdtsc();
        int r = run(t, q, &b);
        t1 = rdtsc();
        if (r < 0)
                return;         /* the next blk action re-initialises the device */
        line_start("blkbench done", &b);
        con_kv("ops", b.completed);
        con_kv("bytes", (b.completed - b.errors) * b.block);
        con_kv("errors", b.errors);
        con_kv("tsc", t1 - t0);
        con_kvx("check", b.check);
        con_kv("glitches", b.glitches);
        con_end();
        t->ack_interrupt(q);    /* after the timed part: at most two VM exits */
}

/* ---- virtio-mmio (vdev.c's selected block device) ---- */

static struct virtq *mmio_open_queue(uint16_t qsize, uint64_t extra_features)
{
        blk_forget();
        return blk_open_queue(qsize, extra_features);
}

static const struct blkbench_transport mmio_transport = {
        .open_queue = mmio_open_queue,
        .capacity = blk_capacity,
        .notify = vq_notify,
        .ack_interrupt = vq_ack_interrupt,
        .device_broken = vq_device_broken,
};

void blkbench_action(const char *arg, size_t n)
{
        blkbench_run(&mmio_transport, arg, n);
}
