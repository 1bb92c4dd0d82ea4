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
static int setup_queue(uint64_t base, struct virtq *q, uint16_t index, uint16_t want)
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
        q->size = max < want ? (uint16_t)max : want;
        wr(base, VIRTIO_MMIO_QUEUE_NUM, q->size);
        split_write(base, VIRTIO_MMIO_QUEUE_DESC_LOW, q->desc);
        split_write(base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, &q->avail);
        split_write(base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, &q->used);
        wr(base, VIRTIO_MMIO_QUEUE_READY, 1);
        return 0;
}

/* 3.1.1 Driver Requirements: Device Initialization */
int virtio_init(struct vdev *d, uint64_t wanted, struct virtq *qs, int nq, uint16_t qsize)
{
        uint64_t base = d->base;
        uint32_t status;

        if (qsize == 0 || qsize > VQ_MAX_SIZE || (qsize & (qsize - 1))) {
                report_error(base, "bad-queue-size");
                return -1;
        }

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
                if (setup_queue(base, &qs[i], (uint16_t)i, qsize) < 0) {
                        report_error(base, "queue-setup");
                        wr(base, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FAILED);
                        return -1;
                }
        for (int i = 0; i < nq; i++)
                qs[i].event_idx = !!(d->features & VIRTIO_RING_F_EVENT_IDX);
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
int vq_add_chain(struct virtq *q, uint16_t head, const struct vbuf *bufs, int n)
{
        if (n < 1 || head + n > q->size)
                return -1;
        for (int i = 0; i < n; i++) {
                uint16_t d = (uint16_t)(head + i);

                q->desc[d].addr = (uint64_t)(uintptr_t)bufs[i].addr;
                q->desc[d].len = bufs[i].len;
                q->desc[d].flags = (uint16_t)((i + 1 < n ? VIRTQ_DESC_F_NEXT : 0) |
                                              (bufs[i].device_writes ? VIRTQ_DESC_F_WRITE : 0));
                q->desc[d].next = (uint16_t)(i + 1 < n ? d + 1 : 0);
        }
        q->avail.ring[q->next_avail % q->size] = head;
        q->next_avail++;
        return 0;
}

uint16_t vq_publish(struct virtq *q)
{
        uint16_t old = q->avail.idx;

        barrier();      /* descriptors and ring entries before the index (TSO) */
        *(volatile uint16_t *)&q->avail.idx = q->next_avail;
        return old;
}

int vq_add(struct virtq *q, const struct vbuf *bufs, int n)
{
        if (vq_add_chain(q, 0, bufs, n) < 0)
                return -1;
        vq_publish(q);
        return 0;
}

void vq_notify(struct virtq *q)
{
        barrier();      /* avail->idx is in memory before the kick (TSO) */
        wr(q->base, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int vq_wait(struct virtq *q, uint32_t *len)
{
        uint32_t spins = 0, id;

        while (!vq_poll_used(q, &id, len)) {
                cpu_relax();
                /* Rarely (each read is a VM exit) check the device is alive. */
                if (++spins % (1u << 20) == 0 && vq_device_broken(q)) {
                        report_error(q->base, "DEVICE_NEEDS_RESET");
                        return -1;
                }
        }
        /* Interrupts stay masked, but acknowledging keeps the device's
         * InterruptStatus honest for the next request. */
        vq_ack_interrupt(q);
        return 0;
}

/* 2.7.7.2 / 2.7.10: whether the device asked to hear about this publish. */
int vq_kick_wanted(struct virtq *q, uint16_t old)
{
        uint16_t new_idx = q->avail.idx;

        /* Our avail->idx store must be visible before we read the device's
         * suppression state, or we may skip a kick the device is waiting for:
         * store-load ordering is the one thing TSO does not give. */
        __asm__ __volatile__("mfence" ::: "memory");
        if (q->event_idx) {
                uint16_t event = *(volatile uint16_t *)((volatile uint8_t *)&q->used + 4 +
                                                        sizeof(struct virtq_used_elem) * q->size);

                /* vring_need_event(): did the index move past avail_event? */
                return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
        }
        return !(*(volatile uint16_t *)&q->used.flags & VIRTQ_USED_F_NO_NOTIFY);
}

void vq_kick(struct virtq *q, uint16_t old)
{
        if (vq_kick_wanted(q, old))
                wr(q->base, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

uint16_t vq_used_ready(struct virtq *q)
{
        return (uint16_t)(*(volatile uint16_t *)&q->used.idx - q->last_used);
}

void vq_take_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
        volatile struct virtq_used_elem *e;

        barrier();      /* read the element only after seeing the index */
        e = (volatile struct virtq_used_elem *)&q->used.ring[q->last_used % q->size];
        *id = e->id;
        *len = e->len;
        q->last_used++;
        if (q->event_idx)       /* used_event: interrupt me after the next completion */
                *(volatile uint16_t *)&q->avail.ring[q->size] = q->last_used;
}

int vq_poll_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
        if (!vq_used_ready(q))
                return 0;
        vq_take_used(q, id, len);
        return 1;
}

void vq_ack_interrupt(struct virtq *q)
{
        uint32_t isr = rd(q->base, VIRTIO_MMIO_INTERRUPT_STATUS);

        if (isr)
                wr(q->base, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

int vq_device_broken(struct virtq *q)
{
        return !!(rd(q->base, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET);
}
