/*
 * A polling virtio-mmio driver core (virtio 1.x: 4.2 "Virtio Over MMIO",
 * version 2 registers only, and 2.7 split virtqueues).
 *
 * Each queue has at most one descriptor chain in flight, always starting at
 * descriptor 0: the test guest issues one request, polls the used ring until
 * the device returns it, and only then issues the next.
 */
#ifndef TESTGUEST_VIRTIO_H
#define TESTGUEST_VIRTIO_H

#include "guest.h"

#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC               0x74726976      /* "virt" */

#define VIRTIO_CONFIG_S_ACKNOWLEDGE     1
#define VIRTIO_CONFIG_S_DRIVER          2
#define VIRTIO_CONFIG_S_DRIVER_OK       4
#define VIRTIO_CONFIG_S_FEATURES_OK     8
#define VIRTIO_CONFIG_S_NEEDS_RESET     0x40
#define VIRTIO_CONFIG_S_FAILED          0x80

#define VIRTIO_F_VERSION_1              (1ull << 32)

#define VIRTIO_ID_NET                   1
#define VIRTIO_ID_BLOCK                 2
#define VIRTIO_ID_RNG                   4

#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2

#define VQ_MAX_SIZE                     16

struct virtq_desc {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
};

struct virtq_avail {
        uint16_t flags;
        uint16_t idx;
        uint16_t ring[VQ_MAX_SIZE];
        uint16_t used_event;
};

struct virtq_used_elem {
        uint32_t id;
        uint32_t len;
};

struct virtq_used {
        uint16_t flags;
        uint16_t idx;
        struct virtq_used_elem ring[VQ_MAX_SIZE];
        uint16_t avail_event;
};

/* One queue in one page: the rings are shared with the device, the rest is
 * driver bookkeeping. */
struct virtq {
        struct virtq_desc desc[VQ_MAX_SIZE];
        struct virtq_avail avail;
        struct virtq_used used __attribute__((aligned(4)));
        uint64_t base;          /* the owning device's window */
        uint16_t index;         /* queue index (QueueSel / QueueNotify value) */
        uint16_t size;
        uint16_t last_used;
} __attribute__((aligned(4096)));

struct vbuf {
        const volatile void *addr;
        uint32_t len;
        int device_writes;      /* VIRTQ_DESC_F_WRITE */
};

struct vdev {
        uint64_t base;
        uint32_t device_id;
        uint64_t features;      /* negotiated */
        int ready;
};

/* Finds the nth (0-based) device with device_id.  Prints the probe once. */
int virtio_find(const struct virtio_params *p, uint32_t device_id, uint64_t nth,
                struct vdev *out);
/* Status sequence 3.1.1 up to DRIVER_OK, with queues 0..nq-1. */
int virtio_init(struct vdev *d, uint64_t wanted, struct virtq *qs, int nq);
uint8_t virtio_config8(const struct vdev *d, uint32_t off);
uint32_t virtio_config32(const struct vdev *d, uint32_t off);
/* Makes bufs[0..n) the queue's next chain and publishes it (no notify). */
int vq_add(struct virtq *q, const struct vbuf *bufs, int n);
void vq_notify(struct virtq *q);
/* Polls for the chain; returns 0 with the used length, -1 if the device
 * asked for a reset. */
int vq_wait(struct virtq *q, uint32_t *len);

#endif
