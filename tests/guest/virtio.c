/*
 * virtio-mmio transport and split-queue core; see virtio.h for the contract.
 *
 * Register accesses are plain volatile 32-bit loads and stores (4.2.2: the
 * driver must use 32-bit accesses for the control registers).  Memory
 * ordering: x86 is TSO, so descriptors written before avail->ring are seen
 * by the device in that order, and the QueueNotify store is ordered after
 * the avail->idx store; the compiler barriers keep gcc from reordering them.
 */
#include "virtio.h"

static uint32_t rd(uint64_t base, uint32_t reg)
{
        return mmio_read32(base + reg);
}

static void wr(uint64_t base, uint32_t reg, uint32_t v)
{
        mmio_write32(base + reg, v);
}

static void report_error(uint64_t base, const char *reason)
{
        con_begin("virtio error");
        con_kvx("base", base);
        con_puts(" reason=");
        con_puts(reason);
        con_end();
}

static void print_probe(const struct virtio_params *p)
{
        static int printed;

        if (printed)
                return;
        printed = 1;
        for (uint64_t i = 0; i < p->count; i++) {
                uint64_t base = p->base + i * p->stride;

                if (rd(base, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC ||
                    rd(base, VIRTIO_MMIO_DEVICE_ID) == 0)
                        continue;       /* no transport, or a transport without a device */
                con_begin("virtio");
                con_kv("slot", i);
                con_kvx("base", base);
                con_kv("id", rd(base, VIRTIO_MMIO_DEVICE_ID));
                con_kv("version", rd(base, VIRTIO_MMIO_VERSION));
                con_end();
        }
}

int virtio_find(const struct virtio_params *p, uint32_t device_id, uint64_t nth,
                struct vdev *out)
{
        print_probe(p);
        for (uint64_t i = 0; i < p->count; i++) {
                uint64_t base = p->base + i * p->stride;

                if (rd(base, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC ||
                    rd(base, VIRTIO_MMIO_DEVICE_ID) != device_id)
                        continue;
                if (nth--)
                        continue;
                out->base = base;
                out->device_id = device_id;
                out->features = 0;
                out->ready = 0;
                return 0;
        }
        return -1;
}

static uint64_t device_features(uint64_t base)
{
        wr(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        uint64_t lo = rd(base, VIRTIO_MMIO_DEVICE_FEATURES);
        wr(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        uint64_t hi = rd(base, VIRTIO_MMIO_DEVICE_FEATURES);
        return hi << 32 | lo;
}

static void split_write(uint64_t base, uint32_t low_reg, const volatile void *p)
{
        uint64_t a = (uint64_t)(uintptr_t)p;

        wr(base, low_reg, (uint32_t)a);
        wr(base, low_reg + 4, (uint32_t)(a >> 32));
}

/* 4.2.3.2 Virtqueue Configuration */
static int setup_queue(uint64_t base, struct virtq *q, uint16_t index)
{
        wr(base, VIRTIO_MMIO_QUEUE_SEL, index);
        if (rd(base, VIRTIO_MMIO_QUEUE_READY) != 0)
                return -1;
        uint32_t max = rd(base, VIRTIO_MMIO_QUEUE_NUM_MAX);
        if (max == 0)
                return -1;
        memset(q, 0, sizeof(*q));
        q->base = base;
        q->index = index;
        q->size = max < VQ_MAX_SIZE ? (uint16_t)max : VQ_MAX_SIZE;
        wr(base, VIRTIO_MMIO_QUEUE_NUM, q->size);
        split_write(base, VIRTIO_MMIO_QUEUE_DESC_LOW, q->desc);
        split_write(base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, &q->avail);
        split_write(base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, &q->used);
        wr(base, VIRTIO_MMIO_QUEUE_READY, 1);
        return 0;
}

/* 3.1.1 Driver Requirements: Device Initialization */
int virtio_init(struct vdev *d, uint64_t wanted, struct virtq *qs, int nq)
{
        uint64_t base = d->base;
        uint32_t status;

        if (rd(base, VIRTIO_MMIO_VERSION) != 2) {
                report_error(base, "not-version-2");
                return -1;
        }
        wr(base, VIRTIO_MMIO_STATUS, 0);
        status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        wr(base, VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        wr(base, VIRTIO_MMIO_STATUS, status);

        uint64_t offered = device_features(base);
        if (!(offered & VIRTIO_F_VERSION_1)) {
                report_error(base, "no-VIRTIO_F_VERSION_1");
                wr(base, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FAILED);
                return -1;
        }
        d->features = offered & (wanted | VIRTIO_F_VERSION_1);
        wr(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)d->features);
        wr(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(d->features >> 32));
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        wr(base, VIRTIO_MMIO_STATUS, status);
        if (!(rd(base, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK)) {
                report_error(base, "FEATURES_OK-refused");
                wr(base, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FAILED);
                return -1;
        }
        for (int i = 0; i < nq; i++)
                if (setup_queue(base, &qs[i], (uint16_t)i) < 0) {
                        report_error(base, "queue-setup");
                        wr(base, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FAILED);
                        return -1;
                }
        status |= VIRTIO_CONFIG_S_DRIVER_OK;
        wr(base, VIRTIO_MMIO_STATUS, status);
        d->ready = 1;

        con_begin("virtio init");
        con_kvx("base", base);
        con_kv("id", d->device_id);
        con_kvx("offered", offered);
        con_kvx("features", d->features);
        con_kv("queue_size", qs[0].size);
        con_kvx("status", rd(base, VIRTIO_MMIO_STATUS));
        con_end();
        return 0;
}

/* 4.2.2.2: read config fields until ConfigGeneration is stable around them. */
uint8_t virtio_config8(const struct vdev *d, uint32_t off)
{
        uint32_t gen;
        uint8_t v;

        do {
                gen = rd(d->base, VIRTIO_MMIO_CONFIG_GENERATION);
                v = *(volatile uint8_t *)phys(d->base + VIRTIO_MMIO_CONFIG + off);
        } while (gen != rd(d->base, VIRTIO_MMIO_CONFIG_GENERATION));
        return v;
}

uint32_t virtio_config32(const struct vdev *d, uint32_t off)
{
        uint32_t gen, v;

        do {
                gen = rd(d->base, VIRTIO_MMIO_CONFIG_GENERATION);
                v = rd(d->base, VIRTIO_MMIO_CONFIG + off);
        } while (gen != rd(d->base, VIRTIO_MMIO_CONFIG_GENERATION));
        return v;
}

/* 2.7.13 Supplying Buffers to The Device */
int vq_add(struct virtq *q, const struct vbuf *bufs, int n)
{
        if (n < 1 || n > q->size)
                return -1;
        for (int i = 0; i < n; i++) {
                q->desc[i].addr = (uint64_t)(uintptr_t)bufs[i].addr;
                q->desc[i].len = bufs[i].len;
                q->desc[i].flags = (uint16_t)((i + 1 < n ? VIRTQ_DESC_F_NEXT : 0) |
                                              (bufs[i].device_writes ? VIRTQ_DESC_F_WRITE : 0));
                q->desc[i].next = (uint16_t)(i + 1 < n ? i + 1 : 0);
        }
        q->avail.ring[q->avail.idx % q->size] = 0;      /* head of the chain */
        barrier();      /* descriptors and ring entry before the index (TSO) */
        *(volatile uint16_t *)&q->avail.idx = (uint16_t)(q->avail.idx + 1);
        return 0;
}

void vq_notify(struct virtq *q)
{
        barrier();      /* avail->idx is in memory before the kick (TSO) */
        wr(q->base, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int vq_wait(struct virtq *q, uint32_t *len)
{
        volatile uint16_t *used_idx = &q->used.idx;
        uint32_t spins = 0;

        while (*used_idx == q->last_used) {
                cpu_relax();
                /* Rarely (each read is a VM exit) check the device is alive. */
                if (++spins % (1u << 20) == 0 &&
                    (rd(q->base, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET)) {
                        report_error(q->base, "DEVICE_NEEDS_RESET");
                        return -1;
                }
        }
        barrier();      /* read the element only after seeing the index */
        *len = ((volatile struct virtq_used_elem *)&q->used.ring[q->last_used % q->size])->len;
        q->last_used++;
        /* Interrupts stay masked, but acknowledging keeps the device's
         * InterruptStatus honest for the next request. */
        uint32_t isr = rd(q->base, VIRTIO_MMIO_INTERRUPT_STATUS);
        if (isr)
                wr(q->base, VIRTIO_MMIO_INTERRUPT_ACK, isr);
        return 0;
}
