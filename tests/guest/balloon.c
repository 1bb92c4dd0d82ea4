/*
 * A polling virtio-balloon driver (5.5) for the kvm tier:
 *
 *   balloon=<start_mib>:<mib>
 *
 * touches every 4 KiB page of guest RAM in [start_mib, start_mib + mib) MiB
 * (prints "balloon touched"), starts the balloon device, waits until the host
 * sets a target (num_pages in the config space, PATCH /balloon), inflates that
 * many pages of the range (PFN arrays of 256 on the inflate queue), writes
 * `actual`, and then counts the inflated pages that still read non-zero: the
 * host gave them back, so each must read as a fresh zero page.
 *
 *   testguest: balloon inflated pages=<n> nonzero=<m>
 */
#include "virtio.h"

#define VIRTIO_ID_BALLOON       5
#define BALLOON_PAGE            4096ull
#define PFNS_PER_BUFFER         256
#define TARGET_POLLS            2000000ull      /* config reads before giving up */

static struct virtio_params params;
static struct vdev dev;
static struct virtq queues[2];                  /* inflate, deflate */
static uint32_t pfns[PFNS_PER_BUFFER] __attribute__((aligned(64)));

void balloon_configure(const struct virtio_params *p)
{
        params = *p;
}

static void fail(const char *why)
{
        con_begin("balloon error=");
        con_puts(why);
        con_end();
}

void balloon_action(const char *arg, size_t n)
{
        const char *colon = arg;
        uint64_t start, mib, target = 0;

        while (colon < arg + n && *colon != ':')
                colon++;
        if (colon == arg + n || parse_u64(arg, (size_t)(colon - arg), &start) < 0 ||
            parse_u64(colon + 1, (size_t)(arg + n - colon - 1), &mib) < 0 || mib == 0) {
                fail("bad-argument");
                return;
        }
        uint64_t first = (start << 20) / BALLOON_PAGE, count = (mib << 20) / BALLOON_PAGE;

        for (uint64_t i = 0; i < count; i++)
                *(volatile uint64_t *)phys((first + i) * BALLOON_PAGE) = 0x5a5a5a5a00000000ull | i;
        con_begin("balloon touched");
        con_kv("pages", count);
        con_end();

        if (virtio_find(&params, VIRTIO_ID_BALLOON, 0, &dev) < 0) {
                fail("no-device");
                return;
        }
        if (virtio_init(&dev, 0, queues, 2, VQ_MAX_SIZE) < 0)
                return;
        for (uint64_t polls = 0; !target; polls++) {
                if (polls == TARGET_POLLS) {
                        fail("no-target");
                        return;
                }
                for (int spin = 0; spin < 1000; spin++)
                        cpu_relax();
                target = virtio_config32(&dev, 0);
        }
        if (target > count)
                target = count;

        for (uint64_t done = 0; done < target;) {
                uint32_t len, batch = (uint32_t)(target - done < PFNS_PER_BUFFER ? target - done : PFNS_PER_BUFFER);
                struct vbuf b = {pfns, batch * 4, 0};

                for (uint32_t i = 0; i < batch; i++)
                        pfns[i] = (uint32_t)(first + done + i);
                vq_add(&queues[0], &b, 1);
                vq_notify(&queues[0]);
                if (vq_wait(&queues[0], &len) < 0)
                        return;
                done += batch;
        }
        mmio_write32(dev.base + VIRTIO_MMIO_CONFIG + 4, (uint32_t)target);   /* actual */

        uint64_t nonzero = 0;
        for (uint64_t i = 0; i < target; i++)
                if (*(volatile uint64_t *)phys((first + i) * BALLOON_PAGE) != 0)
                        nonzero++;
        con_begin("balloon inflated");
        con_kv("pages", target);
        con_kv("nonzero", nonzero);
        con_end();
}
