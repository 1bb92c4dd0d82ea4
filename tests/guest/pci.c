/*
 * PCI bus 0 through ECAM and a polling virtio-pci driver (virtio 1.x, 4.1
 * "Virtio Over PCI Bus", modern devices only), for the VMM's --enable-pci.
 *
 *   pci-rng=<n>              n bytes from virtio-rng        -> "pci rng requested= bytes= crc= hex= isr="
 *   pci-blk=<sector>         one sector from virtio-blk     -> "pci blk sector= status= crc= hex="
 *   pci-move=<addr>:<n>[:live]  moves virtio-rng's BAR to addr (MEMORY off, BAR, MEMORY on; with live, the
 *                            two BAR dwords are written with memory decode on), reads what the old base
 *                            answers now, then n bytes of entropy through the new base
 *                                                           -> "pci move from= to= readback= old_num_queues=",
 *                                                              then a "pci rng" line
 *   pci-bad-bar=<addr>       programs virtio-rng's BAR over guest RAM at addr, checks that RAM there still
 *                            reads what the guest wrote (no device answers), puts the BAR back and reads
 *                            entropy again     -> "pci bad-bar addr= readback= crc_same= ram_ok=", "pci rng"
 *   pci-bad-bar=blk          the same over virtio-blk's BAR (no RAM checks)
 *                                              -> "pci bad-bar addr= readback=", "pci rng"
 *
 *   pci-kick=new|old:<n>     n 16-bit writes of virtio-rng's queue index to its notify address, or to the one
 *                            it had before the last pci-move (spurious kicks: with the VMM's ioeventfd at the
 *                            right place the first are no VM exits, the second all are)
 *                                                           -> "pci kick which= notify= count="
 *
 *   pci-msix=<vector>        re-initialises virtio-rng with MSI-X on: table entry 0 = (local APIC of this CPU,
 *                            vector) and queue 0's vector 0.  A read with entry 0 masked must leave the
 *                            PBA bit set and nothing in the local APIC's IRR; unmasking must deliver
 *                            it (IRR bit set, PBA clear); entry 0 re-aimed at vector + 1 must deliver
 *                            the next read there.  Interrupts stay off (IF=0): the IRR holds them.
 *                                                           -> "pci msix vector= entries= masked_pba=
 *                                                              masked_irr= unmasked_irr= unmasked_pba= moved_irr="
 *   pci-wait=<rng|blk>:<present|absent>
 *                            waits (up to about a minute) until bus 0 has, or no longer has, a function of that
 *                            kind: a hot-plug or unplug by the host.  For absent, the device is released first
 *                            (reset, memory decode off), as Linux does before an unplug.
 *                                                           -> "pci wait dev= for=" (then the host acts),
 *                                                              "pci wait dev= found= slot= scans="
 *   pci-hostile=1            accesses a careless or hostile driver makes (wrong sizes and alignment in
 *                            configuration space, common config, MSI-X table and PBA; writes to read-only
 *                            registers; an absent queue; reconfiguring an enabled queue; an invalid status
 *                            transition), then initialises virtio-rng again and reads from it
 *                                                           -> "pci hostile vendor= absent_queue_size=
 *                                                              desc_kept= ecam_qword=", then "pci rng"
 *   pci-cfgwin=1             uses virtio-rng through the VIRTIO_PCI_CAP_PCI_CFG window (4.1.4.9) alone: reads
 *                            num_queues, writes device_feature_select, reads device_feature, and kicks queue 0
 *                            for an entropy read           -> "pci cfgwin num_queues= df_hi= df_hi_mmio= kicked=",
 *                                                             "pci rng"
 *   pci-blk-resize=1         waits (up to about a minute) for virtio-blk's capacity to change (a PATCH /drives with
 *                            another file), reading it under config_generation (4.1.4.3.1)
 *                                                           -> "pci blk-resize waiting capacity= generation=",
 *                                                              "pci blk-resize capacity= generation= isr="
 *   pci-blkbench=<mode>:<block>:<amount>:<depth>[:ack]
 *                            blkbench.c's read benchmark on virtio-blk over this transport: a fresh queue of
 *                            256 entries with VIRTIO_RING_F_EVENT_IDX if offered, kicks at the notify address;
 *                            ack reads the ISR byte after each batch (an INTx handler's one exit)
 *                                                           -> "blkbench start ...", "blkbench done ..."
 *   pci-cf8=1                lists bus 0 again through CONFIG_ADDRESS/CONFIG_DATA (ports 0xcf8/0xcfc) and
 *                            compares every dword and word read with ECAM
 *                                                           -> "pci cf8 functions= mismatches="
 *
 * The first use prints every function on bus 0 ("pci fn dev= fn= vendor= device= class= header=");
 * initialising a device prints its capabilities ("pci cap ...") and "pci virtio init ...".
 * Errors print "pci error reason=... " and the action stops.
 *
 * Configuration space is read through ECAM (PCI Express 3.0 section 7.2.2: bus << 20 | device << 15 |
 * function << 12 | register) at pci_ecam= (default PCI_ECAM_START of asyncvmm/arch/x86_64/layout.py).
 * The virtio structures must all live in one 64-bit memory BAR, the one the capabilities name (BAR0
 * under asyncvmm, BAR4 under QEMU); "BAR" below means that one.  A BAR found at 0 (nobody assigned
 * it: QEMU microvm with pcie=on runs no firmware that does) is placed at the next free, size-aligned
 * address from pci_mmio= (QEMU microvm's 32-bit PCIe window starts at 0xc0000000); without
 * pci_mmio= such a BAR is an error.
 * BARs are reachable where entry.S maps MMIO: the 3..4 GiB gap and MMIO64_MAP_START..+MMIO64_MAP_SIZE,
 * the start of asyncvmm's 64-bit BAR window for guests below 256 GiB.  Interrupts stay off: no MSI-X
 * vector is assigned (VIRTIO_MSI_NO_VECTOR) and the used ring is polled.
 */
#include "virtio.h"

/* Type-0 header (PCI Local Bus 3.0 section 6.1; names as in Linux's pci_regs.h) */
#define PCI_VENDOR_ID           0x00
#define PCI_DEVICE_ID           0x02
#define PCI_COMMAND             0x04
#define PCI_COMMAND_MEMORY      0x2
#define PCI_COMMAND_MASTER      0x4
#define PCI_STATUS              0x06
#define PCI_STATUS_CAP_LIST     0x10
#define PCI_CLASS_REVISION      0x08    /* revision in bits 7:0, class code above */
#define PCI_HEADER_TYPE         0x0e
#define PCI_HEADER_TYPE_MFD     0x80
#define PCI_BASE_ADDRESS_0      0x10
#define PCI_BASE_ADDRESS_SPACE_IO       0x1
#define PCI_BASE_ADDRESS_MEM_TYPE_MASK  0x6
#define PCI_BASE_ADDRESS_MEM_TYPE_64    0x4
#define PCI_BASE_ADDRESS_MEM_MASK       (~0xfull)
#define PCI_CAPABILITY_LIST     0x34
#define PCI_CAP_ID_VNDR         0x09
#define PCI_CAP_ID_MSIX         0x11
#define PCI_MSIX_FLAGS          2       /* Message Control */
#define PCI_MSIX_FLAGS_QSIZE    0x07ff
#define PCI_MSIX_FLAGS_MASKALL  0x4000
#define PCI_MSIX_FLAGS_ENABLE   0x8000
#define PCI_MSIX_TABLE          4       /* BIR in bits 2:0, offset above */
#define PCI_MSIX_PBA            8
#define PCI_MSIX_BIR            0x7
#define PCI_MSIX_ENTRY_SIZE     16
#define PCI_MSIX_ENTRY_LOWER_ADDR       0
#define PCI_MSIX_ENTRY_UPPER_ADDR       4
#define PCI_MSIX_ENTRY_DATA             8
#define PCI_MSIX_ENTRY_VECTOR_CTRL      12
#define PCI_MSIX_ENTRY_CTRL_MASKBIT     1
/* PCI 3.0 section 3.2.2.3.2, configuration mechanism #1 */
#define PCI_CONFIG_ADDRESS      0xcf8
#define PCI_CONFIG_DATA         0xcfc
#define PCI_CONFIG_ENABLE       0x80000000u
/* The local APIC (SDM 3A 10.4, 10.11: MSI address 0xFEEx_xxxx with the destination in bits 19:12) */
#define LAPIC_BASE              0xfee00000ull
#define LAPIC_ID                0x020
#define LAPIC_SVR               0x0f0
#define LAPIC_SVR_ENABLE        0x100
#define LAPIC_IRR               0x200   /* 8 registers, 16 bytes apart */
#define PCI_MAX_CAPS            48      /* 192 bytes of capabilities, 4 each at least */

/* virtio-pci (4.1.2, 4.1.4) */
#define PCI_VENDOR_ID_REDHAT_QUMRANET   0x1af4
#define VIRTIO_PCI_DEVICE_ID_BASE       0x1040  /* modern device id = 0x1040 + virtio device type */
#define VIRTIO_PCI_CAP_COMMON_CFG       1
#define VIRTIO_PCI_CAP_NOTIFY_CFG       2
#define VIRTIO_PCI_CAP_ISR_CFG          3
#define VIRTIO_PCI_CAP_DEVICE_CFG       4
#define VIRTIO_PCI_CAP_PCI_CFG          5
/* struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length */
#define VIRTIO_PCI_CAP_CFG_TYPE         3
#define VIRTIO_PCI_CAP_BAR              4
#define VIRTIO_PCI_CAP_OFFSET           8
#define VIRTIO_PCI_CAP_LENGTH           12
#define VIRTIO_PCI_NOTIFY_CAP_MULT      16      /* struct virtio_pci_notify_cap */
#define VIRTIO_PCI_CFG_DATA             16      /* struct virtio_pci_cfg_cap: pci_cfg_data[4] */
/* struct virtio_pci_common_cfg (4.1.4.3) */
#define VIRTIO_PCI_COMMON_DFSELECT      0x00
#define VIRTIO_PCI_COMMON_DF            0x04
#define VIRTIO_PCI_COMMON_GFSELECT      0x08
#define VIRTIO_PCI_COMMON_GF            0x0c
#define VIRTIO_PCI_COMMON_MSIX          0x10
#define VIRTIO_PCI_COMMON_NUMQ          0x12
#define VIRTIO_PCI_COMMON_STATUS        0x14
#define VIRTIO_PCI_COMMON_CFGGENERATION 0x15
#define VIRTIO_PCI_COMMON_Q_SELECT      0x16
#define VIRTIO_PCI_COMMON_Q_SIZE        0x18
#define VIRTIO_PCI_COMMON_Q_MSIX        0x1a
#define VIRTIO_PCI_COMMON_Q_ENABLE      0x1c
#define VIRTIO_PCI_COMMON_Q_NOFF        0x1e
#define VIRTIO_PCI_COMMON_Q_DESCLO      0x20
#define VIRTIO_PCI_COMMON_Q_AVAILLO     0x28
#define VIRTIO_PCI_COMMON_Q_USEDLO      0x30
#define VIRTIO_MSI_NO_VECTOR            0xffff

#define BAR0_UNUSED_OFFSET      0x7ffc  /* asyncvmm's BAR0 (docs/pci.md): nothing past the PBA page */
#define RESET_SPINS             (1u << 20)
#define WAIT_TSC                (8ull << 30)    /* a few seconds: a kick the device never saw */
#define WAIT_SCAN_TSC           (1ull << 24)    /* a few ms between scans */
#define WAIT_SCANS              20000
#define RNG_MAX                 4096
#define ECAM_DEFAULT            0xeec00000ull   /* PCI_ECAM_START, asyncvmm/arch/x86_64/layout.py */

struct pci_vdev {
        const char *name;
        uint32_t type;          /* virtio device type */
        uint64_t cfg;           /* ECAM address of the function */
        uint32_t slot;
        uint32_t barno;         /* the BAR holding the structures: 0 under asyncvmm */
        uint64_t bar;           /* its base */
        uint64_t bar_size;
        uint32_t common, isr, device, notify;   /* offsets in that BAR */
        uint32_t notify_mult;
        uint32_t pcicfg;        /* config-space offset of the VIRTIO_PCI_CAP_PCI_CFG capability */
        uint32_t msix;          /* config-space offset of the MSI-X capability, 0 if none */
        uint16_t queue_vector;  /* queue 0's MSI-X vector (VIRTIO_MSI_NO_VECTOR: none) */
        uint16_t queue_size;    /* entries asked for queue 0; 0: VQ_DEFAULT_SIZE */
        uint64_t features;
        int ready;
        struct virtq q;
};

static uint64_t ecam = ECAM_DEFAULT;
static uint64_t bar_next;               /* pci_mmio=: where an unassigned BAR goes; 0: nowhere */
static uint64_t notify_before_move;     /* rng's notify address before the last pci-move */
static struct pci_vdev rng = {.name = "rng", .type = VIRTIO_ID_RNG, .queue_vector = VIRTIO_MSI_NO_VECTOR};
static struct pci_vdev blk = {.name = "blk", .type = VIRTIO_ID_BLOCK, .queue_vector = VIRTIO_MSI_NO_VECTOR};
static uint8_t buf[RNG_MAX] __attribute__((aligned(4096)));
static struct virtio_blk_req_hdr blk_hdr;
static volatile uint8_t blk_status;

void pci_configure(uint64_t ecam_base, uint64_t mmio_base)
{
        ecam = ecam_base;
        bar_next = mmio_base;
}

static void pci_error(const char *reason, uint64_t value)
{
        con_begin("pci error reason=");
        con_puts(reason);
        con_kvx("value", value);
        con_end();
}

/* ---- configuration space (ECAM: every access is one MMIO exit) ---- */

static uint64_t fn_cfg(uint32_t dev, uint32_t fn)
{
        return ecam + ((uint64_t)dev << 15 | (uint64_t)fn << 12);
}

static uint8_t cfg8(uint64_t cfg, uint32_t off) { return mmio_read8(cfg + off); }
static uint16_t cfg16(uint64_t cfg, uint32_t off) { return mmio_read16(cfg + off); }
static uint32_t cfg32(uint64_t cfg, uint32_t off) { return mmio_read32(cfg + off); }
static void cfg_write16(uint64_t cfg, uint32_t off, uint16_t v) { mmio_write16(cfg + off, v); }
static void cfg_write32(uint64_t cfg, uint32_t off, uint32_t v) { mmio_write32(cfg + off, v); }

static void print_function(uint32_t dev, uint32_t fn, uint64_t cfg)
{
        con_begin("pci fn");
        con_kv("dev", dev);
        con_kv("fn", fn);
        con_kvx("vendor", cfg16(cfg, PCI_VENDOR_ID));
        con_kvx("device", cfg16(cfg, PCI_DEVICE_ID));
        con_kvx("class", cfg32(cfg, PCI_CLASS_REVISION) >> 8);
        con_kvx("header", cfg8(cfg, PCI_HEADER_TYPE));
        con_end();
}

/* Bus 0, every device and (for multi-function devices) every function, once. */
static void pci_enumerate(void)
{
        static int done;
        uint32_t found = 0;

        if (done)
                return;
        done = 1;
        for (uint32_t dev = 0; dev < 32; dev++) {
                uint64_t cfg0 = fn_cfg(dev, 0);

                if (cfg16(cfg0, PCI_VENDOR_ID) == 0xffff)
                        continue;
                uint32_t nfn = cfg8(cfg0, PCI_HEADER_TYPE) & PCI_HEADER_TYPE_MFD ? 8 : 1;
                for (uint32_t fn = 0; fn < nfn; fn++) {
                        uint64_t cfg = fn_cfg(dev, fn);

                        if (cfg16(cfg, PCI_VENDOR_ID) == 0xffff)
                                continue;
                        print_function(dev, fn, cfg);
                        found++;
                }
        }
        con_begin("pci bus");
        con_kvx("ecam", ecam);
        con_kv("functions", found);
        con_end();
}

/* ---- the BAR (a 64-bit memory BAR: reg and reg + 4) ---- */

static uint32_t bar_reg(const struct pci_vdev *d)
{
        return PCI_BASE_ADDRESS_0 + 4 * d->barno;
}

static uint64_t bar_read(const struct pci_vdev *d, int *is64)
{
        uint32_t lo = cfg32(d->cfg, bar_reg(d));
        uint64_t addr = lo & PCI_BASE_ADDRESS_MEM_MASK;

        *is64 = !(lo & PCI_BASE_ADDRESS_SPACE_IO) &&
                (lo & PCI_BASE_ADDRESS_MEM_TYPE_MASK) == PCI_BASE_ADDRESS_MEM_TYPE_64;
        if (*is64)
                addr |= (uint64_t)cfg32(d->cfg, bar_reg(d) + 4) << 32;
        return addr;
}

/* PCI 3.0 section 6.2.5.1: all ones, read back, invert (memory decode is off meanwhile). */
static uint64_t bar_size(const struct pci_vdev *d)
{
        uint32_t reg = bar_reg(d);
        uint16_t cmd = cfg16(d->cfg, PCI_COMMAND);
        uint32_t lo = cfg32(d->cfg, reg), hi = cfg32(d->cfg, reg + 4);
        uint64_t mask;

        cfg_write16(d->cfg, PCI_COMMAND, cmd & ~PCI_COMMAND_MEMORY);
        cfg_write32(d->cfg, reg, 0xffffffff);
        cfg_write32(d->cfg, reg + 4, 0xffffffff);
        mask = (uint64_t)cfg32(d->cfg, reg + 4) << 32 | (cfg32(d->cfg, reg) & PCI_BASE_ADDRESS_MEM_MASK);
        cfg_write32(d->cfg, reg, lo);
        cfg_write32(d->cfg, reg + 4, hi);
        cfg_write16(d->cfg, PCI_COMMAND, cmd);
        return ~mask + 1;
}

/* Memory decode off, the BAR = addr, memory decode (and bus mastering) on. */
static void bar_program(const struct pci_vdev *d, uint64_t addr)
{
        uint16_t cmd = cfg16(d->cfg, PCI_COMMAND);

        cfg_write16(d->cfg, PCI_COMMAND, cmd & ~PCI_COMMAND_MEMORY);
        cfg_write32(d->cfg, bar_reg(d), (uint32_t)addr);
        cfg_write32(d->cfg, bar_reg(d) + 4, (uint32_t)(addr >> 32));
        cfg_write16(d->cfg, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
}

/* Whether entry.S maps [addr, addr + size) uncached. */
static int mmio_mapped(uint64_t addr, uint64_t size)
{
        return (addr >= MMIO32_MAP_START && addr + size <= MMIO32_MAP_END) ||
               (addr >= MMIO64_MAP_START && addr + size <= MMIO64_MAP_START + MMIO64_MAP_SIZE);
}

/* ---- capabilities (4.1.4) ---- */

static int read_caps(struct pci_vdev *d)
{
        uint32_t seen = 0, have = 0;

        if (!(cfg16(d->cfg, PCI_STATUS) & PCI_STATUS_CAP_LIST)) {
                pci_error("no-capability-list", cfg16(d->cfg, PCI_STATUS));
                return -1;
        }
        for (uint32_t at = cfg8(d->cfg, PCI_CAPABILITY_LIST) & ~3u; at; at = cfg8(d->cfg, at + 1) & ~3u) {
                uint8_t id = cfg8(d->cfg, at);

                if (at < 0x40 || ++seen > PCI_MAX_CAPS) {
                        pci_error("bad-capability-list", at);
                        return -1;
                }
                con_begin("pci cap");
                con_kv("dev", d->slot);
                con_kvx("at", at);
                con_kvx("id", id);
                if (id == PCI_CAP_ID_MSIX)
                        d->msix = at;
                if (id != PCI_CAP_ID_VNDR) {
                        con_end();
                        continue;
                }
                uint8_t type = cfg8(d->cfg, at + VIRTIO_PCI_CAP_CFG_TYPE);
                uint8_t bar = cfg8(d->cfg, at + VIRTIO_PCI_CAP_BAR);
                uint32_t off = cfg32(d->cfg, at + VIRTIO_PCI_CAP_OFFSET);
                uint32_t len = cfg32(d->cfg, at + VIRTIO_PCI_CAP_LENGTH);

                con_kv("cfg_type", type);
                con_kv("bar", bar);
                con_kvx("offset", off);
                con_kvx("length", len);
                if (type == VIRTIO_PCI_CAP_NOTIFY_CFG) {
                        d->notify_mult = cfg32(d->cfg, at + VIRTIO_PCI_NOTIFY_CAP_MULT);
                        con_kv("notify_off_multiplier", d->notify_mult);
                }
                con_end();
                if (type == VIRTIO_PCI_CAP_PCI_CFG) {
                        d->pcicfg = at;
                        have |= 1u << type;
                        continue;
                }
                if (type < VIRTIO_PCI_CAP_COMMON_CFG || type > VIRTIO_PCI_CAP_DEVICE_CFG ||
                    (have & (1u << type)))
                        continue;       /* 4.1.4.1: use the first of each type */
                if (have & 0x1e) {
                        if (bar != d->barno) {
                                pci_error("structures-in-two-BARs", bar);
                                return -1;
                        }
                } else if (bar > 4) {
                        pci_error("bad-BAR-index", bar);
                        return -1;
                }
                d->barno = bar;
                have |= 1u << type;
                if (type == VIRTIO_PCI_CAP_COMMON_CFG)
                        d->common = off;
                else if (type == VIRTIO_PCI_CAP_ISR_CFG)
                        d->isr = off;
                else if (type == VIRTIO_PCI_CAP_DEVICE_CFG)
                        d->device = off;
                else
                        d->notify = off;
        }
        if ((have & 0x3e) != 0x3e) {
                pci_error("missing-virtio-capability", have);
                return -1;
        }
        return 0;
}

/* ---- common configuration (4.1.4.3): natural-width accesses, 64-bit fields as two halves ---- */

static uint64_t common(const struct pci_vdev *d, uint32_t off)
{
        return d->bar + d->common + off;
}

static void write64(uint64_t addr, const volatile void *p)
{
        uint64_t v = (uint64_t)(uintptr_t)p;

        mmio_write32(addr, (uint32_t)v);
        mmio_write32(addr + 4, (uint32_t)(v >> 32));
}

static void set_status(struct pci_vdev *d, uint8_t s)
{
        mmio_write8(common(d, VIRTIO_PCI_COMMON_STATUS), s);
}

static uint8_t get_status(struct pci_vdev *d)
{
        return mmio_read8(common(d, VIRTIO_PCI_COMMON_STATUS));
}

static int fail(struct pci_vdev *d, uint8_t status, const char *reason, uint64_t value)
{
        pci_error(reason, value);
        set_status(d, status | VIRTIO_CONFIG_S_FAILED);
        return -1;
}

/* 4.1.5.1.3 Virtqueue Configuration, queue 0 only */
static int setup_queue(struct pci_vdev *d, uint16_t want)
{
        struct virtq *q = &d->q;

        mmio_write16(common(d, VIRTIO_PCI_COMMON_Q_SELECT), 0);
        uint16_t max = mmio_read16(common(d, VIRTIO_PCI_COMMON_Q_SIZE));
        if (max == 0 || mmio_read16(common(d, VIRTIO_PCI_COMMON_Q_ENABLE)) != 0)
                return -1;
        memset(q, 0, sizeof(*q));
        q->index = 0;
        q->size = max < want ? max : want;
        q->event_idx = !!(d->features & VIRTIO_RING_F_EVENT_IDX);
        mmio_write16(common(d, VIRTIO_PCI_COMMON_Q_SIZE), q->size);
        /* 4.1.5.1.2.1: the device answers VIRTIO_MSI_NO_VECTOR if it cannot use the vector */
        mmio_write16(common(d, VIRTIO_PCI_COMMON_Q_MSIX), d->queue_vector);
        if (mmio_read16(common(d, VIRTIO_PCI_COMMON_Q_MSIX)) != d->queue_vector)
                return -1;
        write64(common(d, VIRTIO_PCI_COMMON_Q_DESCLO), q->desc);
        write64(common(d, VIRTIO_PCI_COMMON_Q_AVAILLO), &q->avail);
        write64(common(d, VIRTIO_PCI_COMMON_Q_USEDLO), &q->used);
        /* 4.1.4.4: the queue's notification address is notify + queue_notify_off * multiplier */
        q->base = d->bar + d->notify +
                  (uint64_t)mmio_read16(common(d, VIRTIO_PCI_COMMON_Q_NOFF)) * d->notify_mult;
        mmio_write16(common(d, VIRTIO_PCI_COMMON_Q_ENABLE), 1);
        return 0;
}

/* 3.1.1 Device Initialization, through the common configuration structure */
static int virtio_pci_init(struct pci_vdev *d, uint64_t wanted)
{
        uint8_t status;
        uint32_t spins = 0;

        set_status(d, 0);
        while (get_status(d) != 0)              /* 4.1.4.3.2: the reset is done when 0 reads back */
                if (++spins == RESET_SPINS)
                        return fail(d, 0, "reset-never-completed", get_status(d));
        mmio_write16(common(d, VIRTIO_PCI_COMMON_MSIX), VIRTIO_MSI_NO_VECTOR);
        status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        set_status(d, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        set_status(d, status);

        mmio_write32(common(d, VIRTIO_PCI_COMMON_DFSELECT), 0);
        uint64_t offered = mmio_read32(common(d, VIRTIO_PCI_COMMON_DF));
        mmio_write32(common(d, VIRTIO_PCI_COMMON_DFSELECT), 1);
        offered |= (uint64_t)mmio_read32(common(d, VIRTIO_PCI_COMMON_DF)) << 32;
        if (!(offered & VIRTIO_F_VERSION_1))
                return fail(d, status, "no-VIRTIO_F_VERSION_1", offered);
        d->features = offered & (wanted | VIRTIO_F_VERSION_1);
        mmio_write32(common(d, VIRTIO_PCI_COMMON_GFSELECT), 0);
        mmio_write32(common(d, VIRTIO_PCI_COMMON_GF), (uint32_t)d->features);
        mmio_write32(common(d, VIRTIO_PCI_COMMON_GFSELECT), 1);
        mmio_write32(common(d, VIRTIO_PCI_COMMON_GF), (uint32_t)(d->features >> 32));
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        set_status(d, status);
        if (!(get_status(d) & VIRTIO_CONFIG_S_FEATURES_OK))
                return fail(d, status, "FEATURES_OK-refused", get_status(d));
        if (setup_queue(d, d->queue_size ? d->queue_size : VQ_DEFAULT_SIZE) < 0)
                return fail(d, status, "queue-setup", mmio_read16(common(d, VIRTIO_PCI_COMMON_Q_SIZE)));
        status |= VIRTIO_CONFIG_S_DRIVER_OK;
        set_status(d, status);
        d->ready = 1;

        con_begin("pci virtio init");
        con_puts(" dev=");
        con_puts(d->name);
        con_kv("bar_index", d->barno);
        con_kvx("bar", d->bar);
        con_kvx("bar_size", d->bar_size);
        con_kv("num_queues", mmio_read16(common(d, VIRTIO_PCI_COMMON_NUMQ)));
        con_kvx("offered", offered);
        con_kvx("features", d->features);
        con_kv("queue_size", d->q.size);
        con_kvx("notify", d->q.base);
        con_kvx("status", get_status(d));
        con_end();
        return 0;
}

/* The slot of the first function 0 on bus 0 that is a d->type virtio device, or -1. */
static int find_slot(const struct pci_vdev *d)
{
        for (uint32_t dev = 0; dev < 32; dev++) {
                uint64_t cfg = fn_cfg(dev, 0);

                if (cfg16(cfg, PCI_VENDOR_ID) == PCI_VENDOR_ID_REDHAT_QUMRANET &&
                    cfg16(cfg, PCI_DEVICE_ID) == VIRTIO_PCI_DEVICE_ID_BASE + d->type)
                        return (int)dev;
        }
        return -1;
}

/* Finds the device on bus 0, turns its BAR's memory decode on and initialises it, once. */
static int pci_ensure(struct pci_vdev *d, uint64_t wanted)
{
        int is64;

        if (d->ready)
                return 0;
        pci_enumerate();
        int slot = find_slot(d);
        if (slot < 0) {
                pci_error("no-device", VIRTIO_PCI_DEVICE_ID_BASE + d->type);
                return -1;
        }
        d->slot = (uint32_t)slot;
        d->cfg = fn_cfg(d->slot, 0);
        d->msix = 0;
        if (read_caps(d) < 0)
                return -1;
        d->bar = bar_read(d, &is64);
        if (!is64) {
                pci_error("BAR-not-64-bit-memory", cfg32(d->cfg, bar_reg(d)));
                return -1;
        }
        d->bar_size = bar_size(d);
        if (d->bar == 0 && bar_next) {          /* unassigned: place it (a power of two, 6.2.5.1) */
                d->bar = (bar_next + d->bar_size - 1) & ~(d->bar_size - 1);
                bar_next = d->bar + d->bar_size;
        }
        if (!mmio_mapped(d->bar, d->bar_size)) {
                pci_error("BAR-outside-the-guest-mapping", d->bar);
                return -1;
        }
        bar_program(d, d->bar);         /* the same address: turns memory decode on */
        return virtio_pci_init(d, wanted);
}

/* ---- requests ---- */

static void notify(struct virtq *q)
{
        barrier();      /* avail->idx is in memory before the kick (TSO) */
        mmio_write16(q->base, q->index);        /* 4.1.5.2: the queue index, 16 bits */
}

/* Polls queue 0 for the chain; reads ISR (read-to-clear, 4.1.4.5) afterwards. */
static int pci_wait(struct pci_vdev *d, uint32_t *len, uint8_t *isr)
{
        uint64_t start = rdtsc();
        uint32_t id;

        while (!vq_poll_used(&d->q, &id, len)) {
                cpu_relax();
                if (rdtsc() - start > WAIT_TSC) {
                        con_begin("pci error reason=timeout dev=");
                        con_puts(d->name);
                        con_kvx("notify", d->q.base);
                        con_kv("used_idx", *(volatile uint16_t *)&d->q.used.idx);
                        con_kvx("status", get_status(d));
                        con_end();
                        return -1;
                }
        }
        *isr = mmio_read8(d->bar + d->isr);
        return 0;
}

static int rng_read(uint64_t want)
{
        struct vbuf b = {buf, (uint32_t)want, 1};
        uint32_t got;
        uint8_t isr;

        memset(buf, 0, want);
        vq_add(&rng.q, &b, 1);
        notify(&rng.q);
        if (pci_wait(&rng, &got, &isr) < 0)
                return -1;
        if (got > want)
                got = (uint32_t)want;
        con_begin("pci rng");
        con_kv("requested", want);
        con_kv("bytes", got);
        con_puts(" crc=");
        con_hex32(crc32_update(0, buf, got));
        con_puts(" hex=");
        con_bytes_hex(buf, got < 16 ? got : 16);
        con_kvx("isr", isr);
        con_kvx("bar", rng.bar);
        con_end();
        return 0;
}

static int parse_rng_count(const char *s, size_t n, uint64_t *want)
{
        return parse_u64(s, n, want) < 0 || *want == 0 || *want > RNG_MAX ? -1 : 0;
}

static void bad_argument(const char *what, const char *arg, size_t n)
{
        con_begin("pci error=bad-argument action=");
        con_puts(what);
        con_puts(" arg=");
        con_write(arg, n);
        con_end();
}

void pci_rng_action(const char *arg, size_t n)
{
        uint64_t want;

        if (parse_rng_count(arg, n, &want) < 0) {
                bad_argument("pci-rng", arg, n);
                return;
        }
        if (pci_ensure(&rng, 0) == 0)
                rng_read(want);
}

/* ---- blkbench.c's loop on virtio-blk over virtio-pci ---- */

static struct virtq *blkbench_open_queue(uint16_t qsize, uint64_t extra_features)
{
        blk.ready = 0;                  /* reset and set up afresh: indices from 0 */
        blk.queue_size = qsize;
        return pci_ensure(&blk, extra_features) < 0 ? 0 : &blk.q;
}

/* virtio_blk_config.capacity (5.2.4), two 32-bit halves */
static uint64_t blkbench_capacity(void)
{
        return mmio_read32(blk.bar + blk.device) | (uint64_t)mmio_read32(blk.bar + blk.device + 4) << 32;
}

static void blkbench_ack(struct virtq *q)
{
        (void)q;
        (void)mmio_read8(blk.bar + blk.isr);    /* read to clear (4.1.4.5) */
}

static int blkbench_broken(struct virtq *q)
{
        (void)q;
        return !!(get_status(&blk) & VIRTIO_CONFIG_S_NEEDS_RESET);
}

static const struct blkbench_transport pci_transport = {
        .open_queue = blkbench_open_queue,
        .capacity = blkbench_capacity,
        .notify = notify,
        .ack_interrupt = blkbench_ack,
        .device_broken = blkbench_broken,
};

void pci_blkbench_action(const char *arg, size_t n)
{
        blkbench_run(&pci_transport, arg, n);
        blk.ready = 0;                  /* the next use sets up its own 16-entry queue */
        blk.queue_size = 0;
}

void pci_blk_action(const char *arg, size_t n)
{
        uint64_t sector;
        uint32_t used;
        uint8_t isr;

        if (parse_u64(arg, n, &sector) < 0) {
                bad_argument("pci-blk", arg, n);
                return;
        }
        if (pci_ensure(&blk, 0) < 0)
                return;
        blk_hdr = (struct virtio_blk_req_hdr){VIRTIO_BLK_T_IN, 0, sector};
        blk_status = 0xff;
        memset(buf, 0, SECTOR_SIZE);
        struct vbuf b[3] = {
                {&blk_hdr, sizeof(blk_hdr), 0},
                {buf, SECTOR_SIZE, 1},
                {&blk_status, 1, 1},
        };
        vq_add(&blk.q, b, 3);
        notify(&blk.q);
        if (pci_wait(&blk, &used, &isr) < 0)
                return;
        con_begin("pci blk");
        con_kv("sector", sector);
        /* virtio_blk_config.capacity (5.2.4), two 32-bit halves */
        con_kv("capacity", blkbench_capacity());
        con_kv("status", blk_status);
        con_kv("used", used);
        con_puts(" crc=");
        con_hex32(crc32_update(0, buf, SECTOR_SIZE));
        con_puts(" hex=");
        con_bytes_hex(buf, 16);
        con_kvx("isr", isr);
        con_end();
}

/* Moves the rng device's BAR; the VMM must move its MMIO mapping and notify ioeventfds along. */
static int rng_move(uint64_t to, int live)
{
        int is64;

        if (live) {     /* memory decode stays on: the BAR passes through (new low | old high) */
                cfg_write32(rng.cfg, bar_reg(&rng), (uint32_t)to);
                cfg_write32(rng.cfg, bar_reg(&rng) + 4, (uint32_t)(to >> 32));
        } else {
                bar_program(&rng, to);
        }
        uint64_t readback = bar_read(&rng, &is64);
        rng.q.base = rng.q.base - rng.bar + readback;
        rng.bar = readback;
        return readback == to ? 0 : -1;
}

void pci_move_action(const char *arg, size_t n)
{
        const char *f[3];
        size_t fl[3];
        uint64_t to, want;
        int nf = split_fields(arg, n, f, fl, 3), live = nf == 3 && word_is(f[2], fl[2], "live");

        if (nf < 2 || (nf == 3 && !live) || parse_u64(f[0], fl[0], &to) < 0 ||
            parse_rng_count(f[1], fl[1], &want) < 0) {
                bad_argument("pci-move", arg, n);
                return;
        }
        if (pci_ensure(&rng, 0) < 0)
                return;
        if (to % rng.bar_size || !mmio_mapped(to, rng.bar_size)) {
                pci_error("move-target-outside-the-guest-mapping", to);
                return;
        }
        uint64_t from = rng.bar;
        notify_before_move = rng.q.base;
        int ok = rng_move(to, live) == 0;

        con_begin("pci move");
        con_kvx("from", from);
        con_kvx("to", to);
        con_kvx("readback", rng.bar);
        /* nothing decodes the old base any more: all ones */
        con_kvx("old_num_queues", mmio_read16(from + rng.common + VIRTIO_PCI_COMMON_NUMQ));
        con_kvx("new_num_queues", mmio_read16(rng.bar + rng.common + VIRTIO_PCI_COMMON_NUMQ));
        con_end();
        if (ok)
                rng_read(want);
}

void pci_kick_action(const char *arg, size_t n)
{
        const char *f[2];
        size_t fl[2];
        uint64_t count, addr;
        int old;

        if (split_fields(arg, n, f, fl, 2) != 2 || parse_u64(f[1], fl[1], &count) < 0 ||
            (!(old = word_is(f[0], fl[0], "old")) && !word_is(f[0], fl[0], "new"))) {
                bad_argument("pci-kick", arg, n);
                return;
        }
        if (pci_ensure(&rng, 0) < 0)
                return;
        addr = old ? notify_before_move : rng.q.base;
        if (!addr) {
                pci_error("no-move-before-kick-old", 0);
                return;
        }
        barrier();
        for (uint64_t i = 0; i < count; i++)
                mmio_write16(addr, rng.q.index);
        con_begin("pci kick which=");
        con_puts(old ? "old" : "new");
        con_kvx("notify", addr);
        con_kv("count", count);
        con_end();
}

/* ---- MSI-X (PCI 3.0 section 6.8.2) into the local APIC's IRR ---- */

/* Where the MSI-X structure whose Offset/BIR register is at reg lives: in the virtio BAR (asyncvmm),
 * or another memory BAR (QEMU's BAR1), programmed by firmware. */
static uint64_t msix_structure(const struct pci_vdev *d, uint32_t reg)
{
        uint32_t v = cfg32(d->cfg, d->msix + reg), bir = v & PCI_MSIX_BIR;
        uint32_t lo = cfg32(d->cfg, PCI_BASE_ADDRESS_0 + 4 * bir);
        uint64_t base = lo & PCI_BASE_ADDRESS_MEM_MASK;

        if (bir == d->barno)
                base = d->bar;
        else if ((lo & PCI_BASE_ADDRESS_MEM_TYPE_MASK) == PCI_BASE_ADDRESS_MEM_TYPE_64)
                base |= (uint64_t)cfg32(d->cfg, PCI_BASE_ADDRESS_0 + 4 * bir + 4) << 32;
        return base + (v & ~PCI_MSIX_BIR);
}

static uint64_t msix_entry(const struct pci_vdev *d, uint32_t entry, uint32_t field)
{
        return msix_structure(d, PCI_MSIX_TABLE) + entry * PCI_MSIX_ENTRY_SIZE + field;
}

static int msix_pending(const struct pci_vdev *d, uint32_t entry)
{
        return (mmio_read32(msix_structure(d, PCI_MSIX_PBA) + entry / 32 * 4) >> (entry % 32)) & 1;
}

static int irr_set(uint32_t vector)
{
        return (mmio_read32(LAPIC_BASE + LAPIC_IRR + vector / 32 * 0x10) >> (vector % 32)) & 1;
}

/* Polls fn(arg) for up to WAIT_TSC; the last answer. */
static int wait_for(int (*fn)(uint32_t), uint32_t arg)
{
        uint64_t start = rdtsc();
        int v;

        while (!(v = fn(arg)) && rdtsc() - start < WAIT_TSC)
                cpu_relax();
        return v;
}

static int rng_entry0_pending(uint32_t unused)
{
        (void)unused;
        return msix_pending(&rng, 0);
}

static void msix_aim(const struct pci_vdev *d, uint32_t apic_id, uint32_t vector, int masked)
{
        mmio_write32(msix_entry(d, 0, PCI_MSIX_ENTRY_VECTOR_CTRL), PCI_MSIX_ENTRY_CTRL_MASKBIT);
        mmio_write32(msix_entry(d, 0, PCI_MSIX_ENTRY_LOWER_ADDR), (uint32_t)LAPIC_BASE | apic_id << 12);
        mmio_write32(msix_entry(d, 0, PCI_MSIX_ENTRY_UPPER_ADDR), 0);
        mmio_write32(msix_entry(d, 0, PCI_MSIX_ENTRY_DATA), vector);   /* fixed, edge */
        if (!masked)
                mmio_write32(msix_entry(d, 0, PCI_MSIX_ENTRY_VECTOR_CTRL), 0);
}

void pci_msix_action(const char *arg, size_t n)
{
        uint64_t vector;

        if (parse_u64(arg, n, &vector) < 0 || vector < 0x20 || vector > 0xfe) {
                bad_argument("pci-msix", arg, n);
                return;
        }
        if (pci_ensure(&rng, 0) < 0)
                return;
        if (!rng.msix || !mmio_mapped(msix_structure(&rng, PCI_MSIX_TABLE), PCI_MSIX_ENTRY_SIZE) ||
            !mmio_mapped(msix_structure(&rng, PCI_MSIX_PBA), 4)) {
                pci_error("no-reachable-MSI-X-table", rng.msix);
                return;
        }
        uint32_t apic_id = mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
        uint16_t ctrl = cfg16(rng.cfg, rng.msix + PCI_MSIX_FLAGS);

        /* Fixed interrupts reach a software-enabled local APIC only; IF=0 keeps them in IRR. */
        mmio_write32(LAPIC_BASE + LAPIC_SVR, mmio_read32(LAPIC_BASE + LAPIC_SVR) | LAPIC_SVR_ENABLE);
        cfg_write16(rng.cfg, rng.msix + PCI_MSIX_FLAGS, ctrl | PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
        msix_aim(&rng, apic_id, (uint32_t)vector, 1);
        cfg_write16(rng.cfg, rng.msix + PCI_MSIX_FLAGS, (ctrl | PCI_MSIX_FLAGS_ENABLE) & ~PCI_MSIX_FLAGS_MASKALL);
        rng.ready = 0;
        rng.queue_vector = 0;
        if (virtio_pci_init(&rng, 0) < 0)
                return;

        rng_read(16);                                   /* entry 0 masked: pending, not sent */
        int masked_pba = wait_for(rng_entry0_pending, 0);
        int masked_irr = irr_set((uint32_t)vector);
        mmio_write32(msix_entry(&rng, 0, PCI_MSIX_ENTRY_VECTOR_CTRL), 0);      /* unmask: sent now */
        int unmasked_irr = wait_for(irr_set, (uint32_t)vector);
        int unmasked_pba = msix_pending(&rng, 0);
        msix_aim(&rng, apic_id, (uint32_t)vector + 1, 0);
        rng_read(16);                                   /* to the new vector */
        int moved_irr = wait_for(irr_set, (uint32_t)vector + 1);

        con_begin("pci msix");
        con_kvx("vector", vector);
        con_kv("apic_id", apic_id);
        con_kv("entries", (cfg16(rng.cfg, rng.msix + PCI_MSIX_FLAGS) & PCI_MSIX_FLAGS_QSIZE) + 1u);
        con_kv("masked_pba", (uint64_t)masked_pba);
        con_kv("masked_irr", (uint64_t)masked_irr);
        con_kv("unmasked_irr", (uint64_t)unmasked_irr);
        con_kv("unmasked_pba", (uint64_t)unmasked_pba);
        con_kv("moved_irr", (uint64_t)moved_irr);
        con_end();
}

/* ---- a driver that breaks the rules: the VMM must ignore it and carry on ---- */

static uint64_t mmio_read64(uint64_t addr)
{
        return *(volatile uint64_t *)phys(addr);
}

static void mmio_write64(uint64_t addr, uint64_t v)
{
        *(volatile uint64_t *)phys(addr) = v;
}

void pci_hostile_action(const char *arg, size_t n)
{
        if (!word_is(arg, n, "1")) {
                bad_argument("pci-hostile", arg, n);
                return;
        }
        if (pci_ensure(&rng, 0) < 0)
                return;
        /* configuration space: a QWORD, an unaligned DWORD, a write to the read-only vendor ID */
        uint64_t ecam_qword = mmio_read64(rng.cfg + PCI_VENDOR_ID);
        (void)cfg32(rng.cfg, PCI_VENDOR_ID + 2);
        cfg_write16(rng.cfg, PCI_VENDOR_ID, 0x1234);
        uint16_t vendor = cfg16(rng.cfg, PCI_VENDOR_ID);
        /* CONFIG_ADDRESS without the enable bit: CONFIG_DATA reads all ones */
        outl(PCI_CONFIG_ADDRESS, rng.slot << 11);
        (void)inl(PCI_CONFIG_DATA);
        outl(PCI_CONFIG_ADDRESS, 0);

        /* common configuration: wrong widths, an absent queue, an enabled queue reconfigured */
        mmio_write32(common(&rng, VIRTIO_PCI_COMMON_Q_SELECT - 2), 0xffffffff);       /* over two fields */
        (void)mmio_read64(common(&rng, VIRTIO_PCI_COMMON_DFSELECT));
        mmio_write16(common(&rng, VIRTIO_PCI_COMMON_Q_SELECT), 5);
        uint16_t absent_size = mmio_read16(common(&rng, VIRTIO_PCI_COMMON_Q_SIZE));
        mmio_write16(common(&rng, VIRTIO_PCI_COMMON_Q_ENABLE), 1);
        mmio_write16(common(&rng, VIRTIO_PCI_COMMON_Q_SELECT), 0);
        mmio_write32(common(&rng, VIRTIO_PCI_COMMON_Q_DESCLO), 0x1000);
        int desc_kept = mmio_read32(common(&rng, VIRTIO_PCI_COMMON_Q_DESCLO)) ==
                        (uint32_t)(uintptr_t)rng.q.desc;
        mmio_write8(rng.bar + rng.isr, 0xff);                           /* ISR is read-only */
        mmio_write16(rng.bar + rng.notify + 9 * rng.notify_mult, 9);    /* no queue 9 */
        mmio_write64(rng.bar + rng.notify, 0);                          /* not a 16-bit kick */
        (void)mmio_read32(rng.bar + rng.device + 0xffc);               /* rng has no device config */
        (void)mmio_read32(rng.bar + BAR0_UNUSED_OFFSET);
        if (rng.msix) {
                mmio_write16(msix_entry(&rng, 0, PCI_MSIX_ENTRY_DATA), 0x41);   /* not a DWORD */
                (void)mmio_read32(msix_entry(&rng, 64, 0));                     /* beyond the table */
                mmio_write32(msix_structure(&rng, PCI_MSIX_PBA), 0xffffffff);    /* PBA is read-only */
        }
        /* an unmasked MSI-X vector whose address is no local APIC's */
        if (rng.msix) {
                uint16_t ctrl = cfg16(rng.cfg, rng.msix + PCI_MSIX_FLAGS);

                cfg_write16(rng.cfg, rng.msix + PCI_MSIX_FLAGS, ctrl | PCI_MSIX_FLAGS_ENABLE);
                mmio_write32(msix_entry(&rng, 1, PCI_MSIX_ENTRY_LOWER_ADDR), 0x1000);
                mmio_write32(msix_entry(&rng, 1, PCI_MSIX_ENTRY_DATA), 0x30);
                mmio_write32(msix_entry(&rng, 1, PCI_MSIX_ENTRY_VECTOR_CTRL), 0);
                cfg_write16(rng.cfg, rng.msix + PCI_MSIX_FLAGS, ctrl);
        }
        /* an invalid status transition: DRIVER_OK straight after a reset */
        set_status(&rng, 0);
        while (get_status(&rng) != 0)
                cpu_relax();
        set_status(&rng, VIRTIO_CONFIG_S_DRIVER_OK);

        con_begin("pci hostile");
        con_kvx("vendor", vendor);
        con_kv("absent_queue_size", absent_size);
        con_kv("desc_kept", (uint64_t)desc_kept);
        con_kvx("ecam_qword", ecam_qword);
        con_kvx("status_after_bad_transition", get_status(&rng));
        con_end();
        rng.ready = 0;
        if (pci_ensure(&rng, 0) == 0)
                rng_read(16);
}

/* ---- the configuration-space window into the BAR (4.1.4.9) ---- */

static void cfgwin_aim(const struct pci_vdev *d, uint32_t offset, uint32_t length)
{
        mmio_write8(d->cfg + d->pcicfg + VIRTIO_PCI_CAP_BAR, (uint8_t)d->barno);
        cfg_write32(d->cfg, d->pcicfg + VIRTIO_PCI_CAP_OFFSET, offset);
        cfg_write32(d->cfg, d->pcicfg + VIRTIO_PCI_CAP_LENGTH, length);
}

void pci_cfgwin_action(const char *arg, size_t n)
{
        if (!word_is(arg, n, "1")) {
                bad_argument("pci-cfgwin", arg, n);
                return;
        }
        if (pci_ensure(&rng, 0) < 0)
                return;
        if (!rng.pcicfg) {
                pci_error("no-VIRTIO_PCI_CAP_PCI_CFG", 0);
                return;
        }
        uint32_t win = rng.pcicfg + VIRTIO_PCI_CFG_DATA;

        cfgwin_aim(&rng, rng.common + VIRTIO_PCI_COMMON_NUMQ, 2);
        uint16_t num_queues = cfg16(rng.cfg, win);
        cfgwin_aim(&rng, rng.common + VIRTIO_PCI_COMMON_DFSELECT, 4);
        cfg_write32(rng.cfg, win, 1);
        uint32_t df_hi_mmio = mmio_read32(common(&rng, VIRTIO_PCI_COMMON_DF));
        cfgwin_aim(&rng, rng.common + VIRTIO_PCI_COMMON_DF, 4);
        uint32_t df_hi = cfg32(rng.cfg, win);
        mmio_write32(common(&rng, VIRTIO_PCI_COMMON_DFSELECT), 0);

        /* an entropy request kicked through the window: no write to the notify address */
        struct vbuf b = {buf, 16, 1};
        uint32_t got;
        uint8_t isr;

        memset(buf, 0, 16);
        vq_add(&rng.q, &b, 1);
        barrier();
        cfgwin_aim(&rng, (uint32_t)(rng.q.base - rng.bar), 2);
        cfg_write16(rng.cfg, win, rng.q.index);
        int kicked = pci_wait(&rng, &got, &isr) == 0;

        con_begin("pci cfgwin");
        con_kv("num_queues", num_queues);
        con_kvx("df_hi", df_hi);
        con_kvx("df_hi_mmio", df_hi_mmio);
        con_kv("kicked", (uint64_t)kicked);
        con_end();
        if (kicked) {
                con_begin("pci rng");
                con_kv("requested", 16);
                con_kv("bytes", got);
                con_puts(" hex=");
                con_bytes_hex(buf, got < 16 ? got : 16);
                con_kvx("bar", rng.bar);
                con_end();
        }
}

/* ---- device configuration changes ---- */

/* virtio_blk_config.capacity, read until config_generation is the same before and after. */
static uint64_t blk_capacity_stable(uint8_t *generation)
{
        uint64_t cap;
        uint8_t gen;

        do {
                gen = mmio_read8(common(&blk, VIRTIO_PCI_COMMON_CFGGENERATION));
                cap = mmio_read32(blk.bar + blk.device) |
                      (uint64_t)mmio_read32(blk.bar + blk.device + 4) << 32;
        } while (gen != mmio_read8(common(&blk, VIRTIO_PCI_COMMON_CFGGENERATION)));
        *generation = gen;
        return cap;
}

void pci_blk_resize_action(const char *arg, size_t n)
{
        uint8_t gen0, gen;
        uint64_t scans = 0, cap;

        if (!word_is(arg, n, "1")) {
                bad_argument("pci-blk-resize", arg, n);
                return;
        }
        if (pci_ensure(&blk, 0) < 0)
                return;
        uint64_t cap0 = blk_capacity_stable(&gen0);
        (void)mmio_read8(blk.bar + blk.isr);            /* start from a clear ISR */
        con_begin("pci blk-resize waiting");
        con_kv("capacity", cap0);
        con_kv("generation", gen0);
        con_end();
        while ((cap = blk_capacity_stable(&gen)) == cap0 && scans++ < WAIT_SCANS)
                for (uint64_t start = rdtsc(); rdtsc() - start < WAIT_SCAN_TSC;)
                        cpu_relax();
        con_begin("pci blk-resize");
        con_kv("capacity", cap);
        con_kv("generation", gen);
        con_kvx("isr", mmio_read8(blk.bar + blk.isr));
        con_end();
}

/* ---- hot-plug: bus 0 rescanned until a function comes or goes ---- */


void pci_wait_action(const char *arg, size_t n)
{
        const char *f[2];
        size_t fl[2];
        struct pci_vdev *d = 0;
        int want_present = 0, slot = -1;
        uint64_t scans = 0;

        if (split_fields(arg, n, f, fl, 2) == 2) {
                d = word_is(f[0], fl[0], "rng") ? &rng : word_is(f[0], fl[0], "blk") ? &blk : 0;
                want_present = word_is(f[1], fl[1], "present");
        }
        if (!d || (!want_present && !word_is(f[1], fl[1], "absent"))) {
                bad_argument("pci-wait", arg, n);
                return;
        }
        pci_enumerate();
        if (!want_present && d->ready) {
                set_status(d, 0);
                cfg_write16(d->cfg, PCI_COMMAND, cfg16(d->cfg, PCI_COMMAND) &
                            ~(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER));
        }
        d->ready = 0;           /* found and initialised again on its next use */
        con_begin("pci wait dev=");
        con_puts(d->name);
        con_puts(want_present ? " for=present" : " for=absent");
        con_end();
        while (scans++ < WAIT_SCANS) {
                slot = find_slot(d);
                if ((slot >= 0) == want_present)
                        break;
                for (uint64_t start = rdtsc(); rdtsc() - start < WAIT_SCAN_TSC;)
                        cpu_relax();
        }
        con_begin("pci wait dev=");
        con_puts(d->name);
        con_kv("found", slot >= 0);
        con_puts(" slot=");
        if (slot >= 0)
                con_dec((uint64_t)slot);
        else
                con_puts("none");
        con_kv("scans", scans);
        con_end();
}

/* ---- configuration mechanism #1 (ports 0xcf8/0xcfc) against ECAM ---- */

static uint32_t cf8_address(uint32_t dev, uint32_t fn, uint32_t reg)
{
        return PCI_CONFIG_ENABLE | dev << 11 | fn << 8 | (reg & 0xfc);
}

void pci_cf8_action(const char *arg, size_t n)
{
        static const uint32_t regs[] = {PCI_VENDOR_ID, PCI_CLASS_REVISION, PCI_BASE_ADDRESS_0,
                                        PCI_BASE_ADDRESS_0 + 4, PCI_CAPABILITY_LIST};
        uint32_t found = 0, mismatches = 0;

        if (!word_is(arg, n, "1")) {
                bad_argument("pci-cf8", arg, n);
                return;
        }
        pci_enumerate();
        for (uint32_t dev = 0; dev < 32; dev++) {
                uint64_t cfg = fn_cfg(dev, 0);

                outl(PCI_CONFIG_ADDRESS, cf8_address(dev, 0, PCI_VENDOR_ID));
                if (inl(PCI_CONFIG_DATA) == 0xffffffff) {
                        mismatches += cfg32(cfg, PCI_VENDOR_ID) != 0xffffffff;
                        continue;
                }
                found++;
                for (size_t i = 0; i < sizeof(regs) / sizeof(regs[0]); i++) {
                        outl(PCI_CONFIG_ADDRESS, cf8_address(dev, 0, regs[i]));
                        mismatches += inl(PCI_CONFIG_DATA) != cfg32(cfg, regs[i]);
                }
                /* a word at CONFIG_DATA + 2: the device ID */
                outl(PCI_CONFIG_ADDRESS, cf8_address(dev, 0, PCI_VENDOR_ID));
                mismatches += inw(PCI_CONFIG_DATA + 2) != cfg16(cfg, PCI_DEVICE_ID);
        }
        con_begin("pci cf8");
        con_kv("functions", found);
        con_kv("mismatches", mismatches);
        con_end();
}

/*
 * Writes a word of RAM and reads it back, then puts the old value back.  Not inlined, and the
 * caller skips words inside it: the range under test may hold the guest's own code.
 */
static __attribute__((noinline)) int ram_word_holds(volatile uint32_t *p, uint32_t v)
{
        uint32_t old = *p, got;

        *p = v;
        got = *p;
        *p = old;
        return got == v;
}

/* RAM under a BAR that nothing may map: words written there read back, the checksum holds. */
static void check_ram_under(uint64_t addr, int *crc_same, int *ram_ok, uint32_t crc_before)
{
        static const uint32_t probe_offsets[] = {
                VIRTIO_PCI_COMMON_DF, VIRTIO_PCI_COMMON_NUMQ & ~3u, VIRTIO_PCI_COMMON_STATUS & ~3u,
        };
        /* If the device answered here, these would be its registers (read-only or selectors);
         * RAM keeps whatever is written. */
        uint64_t probes[] = {
                addr + rng.common + probe_offsets[0], addr + rng.common + probe_offsets[1],
                addr + rng.common + probe_offsets[2], addr + rng.isr, addr + rng.notify,
        };
        uint64_t self = (uint64_t)(uintptr_t)ram_word_holds;

        *ram_ok = 1;
        for (size_t i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
                if (probes[i] + 4 > self - 64 && probes[i] < self + 256)
                        continue;
                *ram_ok &= ram_word_holds(phys(probes[i]), 0x5aa5c33c ^ (uint32_t)i);
        }
        *crc_same = crc32_update(0, phys(addr), rng.bar_size) == crc_before;
}

/* pci-bad-bar=<addr in RAM below 3 GiB>, or pci-bad-bar=blk: over virtio-blk's BAR */
void pci_bad_bar_action(const char *arg, size_t n)
{
        uint64_t addr = 0;
        int over_blk = word_is(arg, n, "blk");

        if (!over_blk && (parse_u64(arg, n, &addr) < 0 || addr % 4)) {
                bad_argument("pci-bad-bar", arg, n);
                return;
        }
        if (pci_ensure(&rng, 0) < 0 || (over_blk && pci_ensure(&blk, 0) < 0))
                return;
        if (over_blk)
                addr = blk.bar;
        else if (addr + rng.bar_size > MMIO32_MAP_START) {
                pci_error("bad-bar-address-not-in-low-RAM", addr);
                return;
        }
        uint64_t home = rng.bar;
        uint32_t crc_before = over_blk ? 0 : crc32_update(0, phys(addr), rng.bar_size);
        int is64, crc_same = 0, ram_ok = 0;

        bar_program(&rng, addr);
        uint64_t readback = bar_read(&rng, &is64);
        if (!over_blk)
                check_ram_under(addr, &crc_same, &ram_ok, crc_before);

        con_begin("pci bad-bar");
        con_kvx("addr", addr);
        con_kvx("readback", readback);
        if (!over_blk) {
                con_kv("crc_same", (uint64_t)crc_same);
                con_kv("ram_ok", (uint64_t)ram_ok);
        }
        con_end();
        /* Back home, where the device must work as before. */
        if (rng_move(home, 0) < 0) {
                pci_error("BAR-did-not-go-back", rng.bar);
                return;
        }
        rng_read(16);
}
