/*
 * Secondary vCPU bring-up with INIT / SIPI / SIPI through the xAPIC, driven
 * from ring 3 (the local APIC page is user-accessible in our page tables).
 *
 * CPUs are taken from the MADT (falling back to APIC ids 0..cpus-1 if there
 * is none).  APs are started one at a time: the BSP publishes the AP's index
 * and ring-3 stack, sends INIT and a SIPI to the trampoline page, and waits
 * (bounded by the TSC) until the AP has checked in from ring 3, so all APs
 * can share the trampoline and one ring-0 stack.  An AP prints its line and
 * then halts in ring 0 (SYS_HALT) so it does not burn a host CPU.
 */
#include "guest.h"

#define LAPIC_BASE              0xfee00000ull
#define LAPIC_ID                0x020
#define LAPIC_SVR               0x0f0
#define LAPIC_ICR_LOW           0x300
#define LAPIC_ICR_HIGH          0x310
#define LAPIC_SVR_ENABLE        0x100
#define ICR_INIT                0x00000500
#define ICR_STARTUP             0x00000600
#define ICR_LEVEL_ASSERT        0x00004000
#define ICR_DELIVERY_PENDING    0x00001000
/* About a second at 2-4 GHz; only reached if an AP never shows up. */
#define AP_WAIT_TSC             (2ull << 30)

static volatile uint32_t aps_up;        /* incremented by each AP from ring 3 */
static volatile uint32_t ap_cur_index;  /* index the starting AP reports */
static uint8_t ap_stacks[MAX_CPUS][4096] __attribute__((aligned(16)));

static uint32_t lapic_read(uint32_t reg)
{
        return mmio_read32(LAPIC_BASE + reg);
}

static void lapic_write(uint32_t reg, uint32_t v)
{
        mmio_write32(LAPIC_BASE + reg, v);
}

static uint32_t lapic_id(void)
{
        return lapic_read(LAPIC_ID) >> 24;
}

static void send_ipi(uint32_t apic_id, uint32_t icr_low)
{
        lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
        lapic_write(LAPIC_ICR_LOW, icr_low);     /* this write sends it */
        while (lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING)
                cpu_relax();
}

static int wait_for_ap(uint32_t before)
{
        uint64_t start = rdtsc();

        while (aps_up == before)
                if (rdtsc() - start > AP_WAIT_TSC)
                        return 0;
                else
                        cpu_relax();
        return 1;
}

static int start_ap(uint32_t index, uint32_t apic_id)
{
        uint32_t before = aps_up;

        ap_cur_index = index;
        ap_boot_rsp = (uint64_t)(uintptr_t)&ap_stacks[index][sizeof(ap_stacks[index])];
        barrier();      /* TSO: the AP sees these stores before the IPIs */
        send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
        send_ipi(apic_id, ICR_STARTUP | (TRAMP_ADDR >> 12));
        if (wait_for_ap(before))
                return 1;
        /* The MP spec sends a second SIPI; it is ignored if the first worked. */
        send_ipi(apic_id, ICR_STARTUP | (TRAMP_ADDR >> 12));
        return wait_for_ap(before);
}

static int madt_or_default(uint32_t *ids, uint64_t cpus)
{
        uint64_t rsdp = acpi_find_rsdp();
        int n = rsdp ? acpi_madt_cpus(rsdp, ids, MAX_CPUS) : -1;

        if (n < 0) {
                con_line("madt missing");
                for (n = 0; n < (int)cpus; n++)
                        ids[n] = (uint32_t)n;
                return n;
        }
        con_begin("madt");
        con_kv("cpus", (uint64_t)n);
        con_puts(" apic_ids=");
        for (int i = 0; i < n; i++) {
                if (i)
                        con_putc(',');
                con_dec(ids[i]);
        }
        con_end();
        return n;
}

void smp_boot(uint64_t cpus)
{
        uint32_t ids[MAX_CPUS], self = lapic_id(), index = 1;
        int n;

        if (cpus < 1 || cpus > MAX_CPUS) {
                con_begin("smp error=bad-cpus");
                con_kv("cpus", cpus);
                con_end();
                return;
        }
        n = madt_or_default(ids, cpus);
        lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | LAPIC_SVR_ENABLE | 0xff);
        memcpy((void *)(uintptr_t)TRAMP_ADDR, ap_tramp, (size_t)(ap_tramp_end - ap_tramp));
        for (int i = 0; i < n && index < cpus; i++) {
                if (ids[i] == self)
                        continue;
                if (!start_ap(index, ids[i])) {
                        con_begin("cpu");
                        con_putc(' ');
                        con_dec(index);
                        con_puts(" timeout");
                        con_kv("apic", ids[i]);
                        con_end();
                }
                index++;
        }
        con_begin("smp");
        con_kv("up", aps_up + 1);
        con_kv("expected", cpus);
        con_kv("bsp_apic", self);
        con_end();
}

void ap_main(void)
{
        uint32_t index = ap_cur_index;

        con_begin("cpu");
        con_putc(' ');
        con_dec(index);
        con_puts(" up");
        con_kv("apic", lapic_id());
        con_end();
        __atomic_fetch_add(&aps_up, 1, __ATOMIC_SEQ_CST);
        guest_syscall(SYS_HALT);
}
