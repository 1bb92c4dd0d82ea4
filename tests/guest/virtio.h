/*
 * A polling virtio-mmio driver core (virtio 1.x: 4.2 "Virtio Over MMIO",
 * version 2 registers only, and 2.7 split virtqueues).
 *
 * Two ways to use a queue:
 *  - one chain at a time (vq_add, vq_notify, vq_wait): the chain always
 *    starts at descriptor 0, the driver polls the used ring until the device
 *    returns it, and only then issues the next;
 *  - many in flight (vq_add_chain at caller-chosen heads, vq_publish,
 *    vq_kick, vq_poll_used), as the block benchmark does; vq_kick honours
 *    VIRTIO_RING_F_EVENT_IDX (2.7.10) or VIRTQ_USED_F_NO_NOTIFY (2.7.7).
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

#define VIRTIO_RING_F_EVENT_IDX         (1ull << 29)
#define VIRTIO_F_VERSION_1              (1ull << 32)

#define VIRTIO_ID_NET                   1
#define VIRTIO_ID_BLOCK                 2
#define VIRTIO_ID_RNG                   4

#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2
#define VIRTQ_USED_F_NO_NOTIFY          1

/* Ring storage is sized for VQ_MAX_SIZE; a queue uses the size its
 * virtio_init() caller asks for (capped by QueueNumMax).  The rings' fields
 * past the used size (used_event, avail_event at ring[size]) are addressed
 * with the real size, so the oversized arrays are harmless. */
#define VQ_MAX_SIZE                     256
#define VQ_DEFAULT_SIZE                 16

/* virtio-blk (5.2), shared by vdev.c and blkbench.c */
#define VIRTIO_BLK_F_RO                 (1ull << 5)
#define VIRTIO_BLK_F_FLUSH              (1ull << 9)
#define VIRTIO_BLK_T_IN                 0
#define VIRTIO_BLK_T_OUT                1
#define VIRTIO_BLK_T_FLUSH              4
#define VIRTIO_BLK_T_GET_ID             8
#define SECTOR_SIZE                     512

struct virtio_blk_req_hdr {
        uint32_t type;
        uint32_t reserved;
        uint64_t sector;
};

struct virtq_desc {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
};

struct virtq_avail {
        uint16_t flags;
        uint16_t idx;
        uint16_t ring[VQ_MAX_SIZE + 1];  /* + used_event at ring[size] */
};

struct virtq_used_elem {
        uint32_t id;
        uint32_t len;
};

struct virtq_used {
        uint16_t flags;
        uint16_t idx;
        struct virtq_used_elem ring[VQ_MAX_SIZE];
        uint16_t avail_event;   /* room for it when size == VQ_MAX_SIZE */
};

/* One queue, page-aligned (8 KiB at VQ_MAX_SIZE): the rings are shared with
 * the device, the rest is driver bookkeeping. */
struct virtq {
        struct virtq_desc desc[VQ_MAX_SIZE];
        struct virtq_avail avail;
        struct virtq_used used __attribute__((aligned(4)));
        uint64_t base;          /* the owning device's window */
        uint16_t index;         /* queue index (QueueSel / QueueNotify value) */
        uint16_t size;
        uint16_t last_used;
        uint16_t next_avail;    /* avail->idx once the added chains are published */
        int event_idx;          /* VIRTIO_RING_F_EVENT_IDX was negotiated */
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
/* Status sequence 3.1.1 up to DRIVER_OK, with queues 0..nq-1 of at most
 * qsize entries (1..VQ_MAX_SIZE, a power of two). */
int virtio_init(struct vdev *d, uint64_t wanted, struct virtq *qs, int nq, uint16_t qsize);
uint8_t virtio_config8(const struct vdev *d, uint32_t off);
uint32_t virtio_config32(const struct vdev *d, uint32_t off);
/* Makes bufs[0..n) the queue's next chain and publishes it (no notify). */
int vq_add(struct virtq *q, const struct vbuf *bufs, int n);
void vq_notify(struct virtq *q);
/* Polls for the chain; returns 0 with the used length, -1 if the device
 * asked for a reset. */
int vq_wait(struct virtq *q, uint32_t *len);

/* Writes bufs[0..n) into descriptors head..head+n-1 and appends head to the
 * avail ring, unpublished.  The caller owns those descriptors. */
int vq_add_chain(struct virtq *q, uint16_t head, const struct vbuf *bufs, int n);
/* Makes the chains added since the last publish visible (avail->idx);
 * returns the index before, for vq_kick. */
uint16_t vq_publish(struct virtq *q);
/* Whether the device wants to hear about avail->idx moving from old (EVENT_IDX or NO_NOTIFY). */
int vq_kick_wanted(struct virtq *q, uint16_t old);
/* Notifies the device (virtio-mmio QueueNotify) if vq_kick_wanted(). */
void vq_kick(struct virtq *q, uint16_t old);
/* Takes one used element if there is one: 1 with its id and length, else 0. */
int vq_poll_used(struct virtq *q, uint32_t *id, uint32_t *len);
/* How far used->idx is ahead of the elements taken (one read of the index). */
uint16_t vq_used_ready(struct virtq *q);
/* Takes the next used element; the caller has seen vq_used_ready() > 0. */
void vq_take_used(struct virtq *q, uint32_t *id, uint32_t *len);
/* Reads InterruptStatus and acknowledges what is set (one VM exit each). */
void vq_ack_interrupt(struct virtq *q);
/* Whether the device has set DEVICE_NEEDS_RESET (a VM exit). */
int vq_device_broken(struct virtq *q);

/* vdev.c: the selected block device (blkdev=N), initialised with a queue of
 * qsize entries and VIRTIO_BLK_F_RO/FLUSH plus extra_features if offered
 * (re-initialised when either differs from the last use); NULL if absent. */
struct virtq *blk_open_queue(uint16_t qsize, uint64_t extra_features);
uint64_t blk_capacity(void);            /* 512-byte sectors, from config space */
void blk_forget(void);                  /* re-initialise the device on its next use */

/* blkbench.c: the block benchmark's request loop, over either transport.  vdev.c's virtio-mmio
 * device (blkbench=) and pci.c's virtio-pci one (pci-blkbench=) each supply these. */
struct blkbench_transport {
        /* The block device reset and initialised afresh (queue indices from 0) with a queue of at
         * most qsize entries and extra_features if offered; NULL (the reason printed) if it failed. */
        struct virtq *(*open_queue)(uint16_t qsize, uint64_t extra_features);
        uint64_t (*capacity)(void);                     /* 512-byte sectors */
        void (*notify)(struct virtq *q);                /* the kick's register write */
        void (*ack_interrupt)(struct virtq *q);         /* what an interrupt handler reads/writes */
        int (*device_broken)(struct virtq *q);          /* DEVICE_NEEDS_RESET set (a VM exit) */
};
void blkbench_run(const struct blkbench_transport *t, const char *arg, size_t n);

#endif
