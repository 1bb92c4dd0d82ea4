/*
 * Just enough ACPI to count CPUs (MADT) and find the sleep control register
 * (FADT), read from ring 3 through the identity map.
 *
 * The RSDP comes from boot_params.acpi_rsdp_addr (Linux protocols), from
 * hvm_start_info.rsdp_paddr (PVH), or from a scan of 0xe0000-0xfffff on
 * 16-byte boundaries (ACPI 6.5, 5.2.5.1).  Table pointers are checked to lie
 * below 4 GiB (all that is mapped) and checksums are verified and reported,
 * since checking the VMM's tables is part of the point.
 */
#include "guest.h"

#define BP_ACPI_RSDP_ADDR       0x070   /* struct boot_params */
#define HVM_RSDP_PADDR          32      /* struct hvm_start_info */
#define SDT_HEADER_LEN          36
#define MADT_ENTRIES            44
#define MADT_TYPE_LOCAL_APIC    0
#define MADT_TYPE_LOCAL_X2APIC  9
#define MADT_ENABLED            1
#define FADT_SLEEP_CONTROL_REG  244     /* a Generic Address Structure */
#define GAS_SPACE_MEMORY        0
#define GAS_SPACE_IO            1
#define FOUR_GIB                (1ull << 32)

static uint8_t rd8(uint64_t a)
{
        return *(volatile uint8_t *)phys(a);
}
static uint32_t rd32(uint64_t a)
{
        return *(volatile uint32_t *)phys(a);
}
static uint64_t rd64(uint64_t a)
{
        return *(volatile uint64_t *)phys(a);
}

static int checksum_ok(uint64_t a, uint32_t len)
{
        uint8_t sum = 0;

        for (uint32_t i = 0; i < len; i++)
                sum = (uint8_t)(sum + rd8(a + i));
        return sum == 0;
}

static int is_rsdp(uint64_t a)
{
        return memcmp((const void *)(uintptr_t)a, "RSD PTR ", 8) == 0 && checksum_ok(a, 20);
}

uint64_t acpi_find_rsdp(void)
{
        static uint64_t found;          /* looked up (and reported) once */
        uint64_t hint = 0;
        const char *source = "scan";

        if (found)
                return found;

        if (boot_kind == BOOT_PVH)
                hint = rd64(boot_info + HVM_RSDP_PADDR);
        else
                hint = rd64(boot_info + BP_ACPI_RSDP_ADDR);
        if (hint && hint < FOUR_GIB - 36 && is_rsdp(hint)) {
                source = boot_kind == BOOT_PVH ? "pvh" : "boot_params";
        } else {
                hint = 0;
                for (uint64_t a = 0xe0000; a < 0x100000; a += 16)
                        if (is_rsdp(a)) {
                                hint = a;
                                break;
                        }
        }
        if (!hint) {
                con_line("acpi rsdp=none");
                return 0;
        }
        con_begin("acpi");
        con_kvx("rsdp", hint);
        con_kv("rev", rd8(hint + 15));
        con_puts(" source=");
        con_puts(source);
        con_end();
        found = hint;
        return hint;
}

/* Finds the table with the 4-byte signature via the XSDT (rev >= 2) or RSDT. */
static uint64_t find_table(uint64_t rsdp, const char *sig)
{
        int xsdt = rd8(rsdp + 15) >= 2 && rd64(rsdp + 24) != 0;
        uint64_t root = xsdt ? rd64(rsdp + 24) : rd32(rsdp + 16);
        unsigned entry = xsdt ? 8 : 4;

        if (root == 0 || root >= FOUR_GIB - SDT_HEADER_LEN)
                return 0;
        uint32_t len = rd32(root + 4);
        if (len < SDT_HEADER_LEN || root + len > FOUR_GIB)
                return 0;
        for (uint32_t off = SDT_HEADER_LEN; off + entry <= len; off += entry) {
                uint64_t t = xsdt ? rd64(root + off) : rd32(root + off);

                if (t && t < FOUR_GIB - SDT_HEADER_LEN &&
                    memcmp((const void *)(uintptr_t)t, sig, 4) == 0) {
                        uint32_t tlen = rd32(t + 4);
                        int ok = tlen >= SDT_HEADER_LEN && t + tlen <= FOUR_GIB &&
                                 checksum_ok(t, tlen);

                        con_begin("acpi table=");
                        con_puts(sig);
                        con_kvx("addr", t);
                        con_kv("len", tlen);
                        con_puts(ok ? " checksum=ok" : " checksum=bad");
                        con_end();
                        return tlen >= SDT_HEADER_LEN && t + tlen <= FOUR_GIB ? t : 0;
                }
        }
        return 0;
}

int acpi_madt_cpus(uint64_t rsdp, uint32_t *apic_ids, int max)
{
        uint64_t madt = find_table(rsdp, "APIC");
        int n = 0;

        if (!madt)
                return -1;
        uint32_t len = rd32(madt + 4);
        for (uint32_t off = MADT_ENTRIES; off + 2 <= len;) {
                uint8_t type = rd8(madt + off), elen = rd8(madt + off + 1);

                if (elen < 2 || off + elen > len)
                        break;          /* malformed: stop rather than loop */
                if (type == MADT_TYPE_LOCAL_APIC && elen >= 8 &&
                    (rd32(madt + off + 4) & MADT_ENABLED) && n < max)
                        apic_ids[n++] = rd8(madt + off + 3);
                else if (type == MADT_TYPE_LOCAL_X2APIC && elen >= 16 &&
                         (rd32(madt + off + 8) & MADT_ENABLED) && n < max)
                        apic_ids[n++] = rd32(madt + off + 4);
                off += elen;
        }
        return n;
}

struct acpi_sleep_reg acpi_fadt_sleep_control(uint64_t rsdp)
{
        struct acpi_sleep_reg r = {0, 0, 0};
        uint64_t fadt = find_table(rsdp, "FACP");

        if (!fadt || rd32(fadt + 4) < FADT_SLEEP_CONTROL_REG + 12)
                return r;
        uint8_t space = rd8(fadt + FADT_SLEEP_CONTROL_REG);
        uint64_t addr = rd64(fadt + FADT_SLEEP_CONTROL_REG + 4);

        if (addr == 0 || (space != GAS_SPACE_IO && space != GAS_SPACE_MEMORY))
                return r;
        if (space == GAS_SPACE_MEMORY && addr >= FOUR_GIB)
                return r;
        r.found = 1;
        r.is_io = space == GAS_SPACE_IO;
        r.addr = addr;
        return r;
}
