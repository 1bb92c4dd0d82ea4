/*
 * blkreset: reset the selected virtio-blk device while reads are in flight,
 * then watch guest memory for anything the device writes afterwards.
 *
 *   blkreset=<block_bytes>:<depth>:<first_block>
 *
 * On a fresh queue, <depth> (1..64) reads of <block_bytes> each, of blocks
 * <first_block>, <first_block> + 1, ... (modulo the device's size), are
 * published with one kick.  Each has descriptors 3*slot.. (header, data,
 * status) and its data buffer at 16 MiB + slot * block_bytes, filled with
 * 0xEE first; status bytes start at 0xff.  The queue has
 * VIRTIO_RING_F_EVENT_IDX, so as soon as the device has taken every chain
 * (its avail_event reaches our avail->idx; or after about a second) the
 * driver writes 0 to Status: a reset, with reads possibly still in the
 * host's hands.  Once that write has completed the device must not
 * touch any of this memory again (virtio 1.x 2.4.1 / 4.2.2.1).  The guest
 * checksums the data buffers, the status bytes and the used ring, spins for
 * about 0.1 s of TSC and checksums them again.
 *
 * Output:
 *   testguest: blkreset done block=B depth=D answered=A filled=F late=L
 * answered is used->idx after the reset (requests the device completed),
 * filled the data buffers whose first 8 bytes are no longer all 0xEE (reads
 * the host carried out, answered or not), late 1 if anything changed after
 * the reset.  Later blk actions re-initialise the device.
 */
#include "virtio.h"

#define RESET_BUF_BASE          0x1000000ull    /* 16 MiB, as blkbench */
#define RESET_BUF_BYTES         (64ull << 20)
#define RESET_MAX_DEPTH         64
#define RESET_QUEUE_SIZE        256
#define WAIT_TAKEN_TSC          (3ull << 30)    /* about a second at 3 GHz */
#define WATCH_TSC               (300ull << 20)  /* about 0.1 s */
#define POISON                  0xEEEEEEEEEEEEEEEEull

static struct virtio_blk_req_hdr hdr[RESET_MAX_DEPTH];
static volatile uint8_t status[RESET_MAX_DEPTH];

static volatile uint8_t *buf_of(uint64_t block, uint64_t slot)
{
        return phys(RESET_BUF_BASE + slot * block);
}

static uint16_t avail_event(struct virtq *q)
{
        return *(volatile uint16_t *)((volatile uint8_t *)&q->used + 4 +
                                      sizeof(struct virtq_used_elem) * q->size);
}

static uint32_t snapshot(struct virtq *q, uint64_t block, uint64_t depth)
{
        uint32_t crc = crc32_update(0, buf_of(block, 0), block * depth);

        crc = crc32_update(crc, status, depth);
        return crc32_update(crc, (const volatile uint8_t *)&q->used, sizeof(q->used));
}

static void bad(const char *arg, size_t n)
{
        con_begin("blkreset error=bad-argument arg=");
        con_write(arg, n);
        con_end();
}

void blkreset_action(const char *arg, size_t n)
{
        const char *f[4];
        size_t fl[4];
        uint64_t block, depth, first, blocks, filled = 0;
        struct virtq *q;

        if (split_fields(arg, n, f, fl, 4) != 3 || parse_u64(f[0], fl[0], &block) < 0 ||
            parse_u64(f[1], fl[1], &depth) < 0 || parse_u64(f[2], fl[2], &first) < 0 ||
            block == 0 || block % SECTOR_SIZE || depth == 0 || depth > RESET_MAX_DEPTH ||
            block > RESET_BUF_BYTES / depth) {
                bad(arg, n);
                return;
        }
        blk_forget();
        q = blk_open_queue(RESET_QUEUE_SIZE, VIRTIO_RING_F_EVENT_IDX);
        if (!q)
                return;
        blocks = blk_capacity() * SECTOR_SIZE / block;
        if (blocks == 0 || q->size < depth * 3) {
                bad(arg, n);
                return;
        }
        for (uint64_t slot = 0; slot < depth; slot++) {
                volatile uint8_t *b = buf_of(block, slot);
                struct vbuf v[3];

                for (uint64_t i = 0; i < block; i += 8)
                        *(volatile uint64_t *)(b + i) = POISON;
                hdr[slot] = (struct virtio_blk_req_hdr){VIRTIO_BLK_T_IN, 0,
                                                        (first + slot) % blocks * (block / SECTOR_SIZE)};
                status[slot] = 0xff;
                v[0] = (struct vbuf){&hdr[slot], sizeof(hdr[slot]), 0};
                v[1] = (struct vbuf){b, (uint32_t)block, 1};
                v[2] = (struct vbuf){&status[slot], 1, 1};
                vq_add_chain(q, (uint16_t)(slot * 3), v, 3);
        }
        vq_kick(q, vq_publish(q));

        /* The device writes avail_event once it has taken every published chain
         * (2.7.10); its I/O for them has started by the time it reads our next
         * register write, the reset. */
        uint64_t t0 = rdtsc();
        while (avail_event(q) != q->avail.idx && rdtsc() - t0 < WAIT_TAKEN_TSC)
                cpu_relax();
        mmio_write32(q->base + VIRTIO_MMIO_STATUS, 0);
        while (mmio_read32(q->base + VIRTIO_MMIO_STATUS) != 0)
                cpu_relax();

        uint16_t answered = vq_used_ready(q);
        uint32_t before = snapshot(q, block, depth);

        t0 = rdtsc();
        while (rdtsc() - t0 < WATCH_TSC)
                cpu_relax();
        uint32_t after = snapshot(q, block, depth);

        for (uint64_t slot = 0; slot < depth; slot++)
                filled += *(volatile uint64_t *)buf_of(block, slot) != POISON;
        blk_forget();
        con_begin("blkreset done");
        con_kv("block", block);
        con_kv("depth", depth);
        con_kv("answered", answered);
        con_kv("filled", filled);
        con_kv("late", before != after);
        con_end();
}
