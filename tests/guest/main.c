/*
 * The test guest's ring-3 main: read the kernel command line the VMM passed,
 * run its actions in order, report each on COM1, then exit as asked.
 *
 * Grammar: space-separated key=value tokens; unknown tokens are ignored.
 * Settings (read first, wherever they appear):
 *   virtio_base=0x..  virtio_stride=0x..  virtio_count=N   where to probe
 *   pmport=0x..  pmmmio=0x..  slptyp=N                     ACPI sleep control
 *   pci_ecam=0x..                                          PCI ECAM base (pci.c)
 *   pci_mmio=0x..                                          where unassigned BARs go (pci.c)
 * Actions (run in command-line order):
 *   boottimer=1  cpus=N  serialecho=1  blkdev=N  blk=...  blkbench=...  blkreset=...  rng=N  net=...
 *   vsock=...  balloon=<start_mib>:<mib>
 *   pci-rng=N  pci-blk=<sector>  pci-move=<addr>:<n>  pci-bad-bar=<addr>
 *   pci-kick=new|old:<n>  pci-msix=<vector>  pci-cf8=1  pci-wait=<dev>:<present|absent>
 *   pci-hostile=1  pci-cfgwin=1  pci-blk-resize=1  pci-blkbench=...   (pci.c)
 *   mmioflood=<addr>:<count>  count=<n>
 *   cpuid=LEAF[.SUBLEAF]                                   (cpuid.c)
 * Exit (runs last; default halt):
 *   exit=halt|reset|triplefault|triplefault0|poweroff
 */
#include "guest.h"

#define CMDLINE_MAX             4096
#define HVM_START_MAGIC         0x336ec578
#define HVM_CMDLINE_PADDR       24      /* struct hvm_start_info */
#define BP_EXT_CMD_LINE_PTR     0x0c8   /* struct boot_params */
#define BP_HDR_MAGIC            0x202   /* "HdrS" */
#define BP_CMD_LINE_PTR         0x228
#define BOOT_TIMER_ADDR         0xc0000000ull
#define BOOT_TIMER_MAGIC        123
#define I8042_COMMAND           0x64
#define I8042_CMD_RESET         0xfe
#define SLP_EN                  (1 << 5)        /* sleep control register, ACPI 4.8.3.7 */
#define SLP_TYP_SHIFT           2
#define EXIT_GRACE_TSC          (2ull << 30)

static char cmdline[CMDLINE_MAX];
static size_t cmdline_len;

static struct {
        struct virtio_params virtio;
        uint64_t pmport, pmmmio, slptyp;
        uint64_t pci_ecam, pci_mmio;
} cfg = {
        .virtio = {0xc0001000, 0x1000, 8},
        .pci_ecam = 0xeec00000,                 /* PCI_ECAM_START in asyncvmm/arch/x86_64/layout.py */
        .slptyp = 5,                            /* S5, soft off */
};

void guest_syscall(uint64_t nr)
{
        __asm__ __volatile__("ud2" : : "a"(nr) : "memory");
        __builtin_unreachable();
}

static void read_boot_info(void)
{
        static const char *const kinds[] = {"unknown", "linux64", "pvh", "linux32"};
        uint64_t info = boot_info, ptr = 0;

        con_begin("boot entry=");
        con_puts(kinds[boot_kind <= BOOT_LINUX32 ? boot_kind : 0]);
        con_kvx("info", info);
        if (boot_kind == BOOT_PVH) {
                int ok = *(volatile uint32_t *)phys(info) == HVM_START_MAGIC;

                con_puts(ok ? " magic=ok" : " magic=bad");
                if (ok)
                        ptr = *(volatile uint64_t *)phys(info + HVM_CMDLINE_PADDR);
        } else {
                con_kv("hdrs", memcmp((const void *)(uintptr_t)(info + BP_HDR_MAGIC), "HdrS", 4) == 0);
                ptr = *(volatile uint32_t *)phys(info + BP_CMD_LINE_PTR) |
                      (uint64_t)*(volatile uint32_t *)phys(info + BP_EXT_CMD_LINE_PTR) << 32;
        }
        con_kvx("cmdline_ptr", ptr);
        con_end();
        if (ptr == 0 || ptr >= (1ull << 32) - CMDLINE_MAX)
                return;
        const volatile char *src = phys(ptr);
        while (cmdline_len < CMDLINE_MAX - 1 && src[cmdline_len])
                cmdline_len++;
        memcpy(cmdline, (const void *)src, cmdline_len);
}

/* Calls fn(key, klen, value, vlen) for each key=value token, in order. */
static void for_each_token(void (*fn)(const char *, size_t, const char *, size_t))
{
        size_t i = 0;

        while (i < cmdline_len) {
                while (i < cmdline_len && (cmdline[i] == ' ' || cmdline[i] == '\t' || cmdline[i] == '\n'))
                        i++;
                size_t start = i, eq = 0;
                while (i < cmdline_len && cmdline[i] != ' ' && cmdline[i] != '\t' && cmdline[i] != '\n') {
                        if (!eq && cmdline[i] == '=')
                                eq = i;
                        i++;
                }
                if (eq > start)
                        fn(cmdline + start, eq - start, cmdline + eq + 1, i - eq - 1);
        }
}

static int key_is(const char *k, size_t kn, const char *want)
{
        return strlen(want) == kn && memcmp(k, want, kn) == 0;
}

static void bad_value(const char *k, size_t kn, const char *v, size_t vn)
{
        con_begin("error=bad-value token=");
        con_write(k, kn);
        con_putc('=');
        con_write(v, vn);
        con_end();
}

static void apply_setting(const char *k, size_t kn, const char *v, size_t vn)
{
        static const struct { const char *key; uint64_t *dst; } settings[] = {
                {"virtio_base", &cfg.virtio.base},
                {"virtio_stride", &cfg.virtio.stride},
                {"virtio_count", &cfg.virtio.count},
                {"pmport", &cfg.pmport},
                {"pmmmio", &cfg.pmmmio},
                {"slptyp", &cfg.slptyp},
                {"pci_ecam", &cfg.pci_ecam},
                {"pci_mmio", &cfg.pci_mmio},
        };

        for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++)
                if (key_is(k, kn, settings[i].key) && parse_u64(v, vn, settings[i].dst) < 0)
                        bad_value(k, kn, v, vn);
}

/* mmioflood=<addr>:<count>: write 0 to the 32-bit register at guest-physical addr,
 * count times (a guest hammering a read-only register: the VMM must not log each). */
static void mmio_flood(const char *v, size_t vn)
{
        const char *f[2];
        size_t fl[2];
        uint64_t addr, count;

        if (split_fields(v, vn, f, fl, 2) != 2 || parse_u64(f[0], fl[0], &addr) < 0 ||
            parse_u64(f[1], fl[1], &count) < 0 || addr % 4) {
                bad_value("mmioflood", 9, v, vn);
                return;
        }
        for (uint64_t i = 0; i < count; i++)
                mmio_write32(addr, 0);
        con_begin("mmioflood");
        con_kvx("addr", addr);
        con_kv("count", count);
        con_end();
}

/* count=<n>: prints "count i=<k>" for k = 1..n, one line every 2^26 TSC ticks (a guest whose
 * progress the host can read: a restored snapshot must continue the count, not restart it). */
static void count_up(uint64_t n)
{
        for (uint64_t i = 1; i <= n; i++) {
                uint64_t start = rdtsc();

                while (rdtsc() - start < (1ull << 26))
                        ;
                con_begin("count");
                con_kv("i", i);
                con_end();
        }
}

static const char *exit_how = "halt";
static size_t exit_how_len = 4;

static void run_action(const char *k, size_t kn, const char *v, size_t vn)
{
        uint64_t n = 0;
        int numeric = parse_u64(v, vn, &n) == 0;

        if (key_is(k, kn, "boottimer") && numeric && n == 1) {
                mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC);
                con_line("boottimer written");
        } else if (key_is(k, kn, "cpus") && numeric) {
                smp_boot(n);
        } else if (key_is(k, kn, "serialecho") && numeric && n == 1) {
                serial_echo();
        } else if (key_is(k, kn, "blkdev") && numeric) {
                blk_select(n);
        } else if (key_is(k, kn, "blk")) {
                blk_action(v, vn);
        } else if (key_is(k, kn, "blkbench")) {
                blkbench_action(v, vn);
        } else if (key_is(k, kn, "blkreset")) {
                blkreset_action(v, vn);
        } else if (key_is(k, kn, "rng")) {
                rng_action(v, vn);
        } else if (key_is(k, kn, "net")) {
                net_action(v, vn);
        } else if (key_is(k, kn, "vsock")) {
                vsock_action(v, vn);
        } else if (key_is(k, kn, "balloon")) {
                balloon_action(v, vn);
        } else if (key_is(k, kn, "pci-rng")) {
                pci_rng_action(v, vn);
        } else if (key_is(k, kn, "pci-blk")) {
                pci_blk_action(v, vn);
        } else if (key_is(k, kn, "pci-move")) {
                pci_move_action(v, vn);
        } else if (key_is(k, kn, "pci-bad-bar")) {
                pci_bad_bar_action(v, vn);
        } else if (key_is(k, kn, "pci-kick")) {
                pci_kick_action(v, vn);
        } else if (key_is(k, kn, "pci-msix")) {
                pci_msix_action(v, vn);
        } else if (key_is(k, kn, "pci-cf8")) {
                pci_cf8_action(v, vn);
        } else if (key_is(k, kn, "pci-wait")) {
                pci_wait_action(v, vn);
        } else if (key_is(k, kn, "pci-hostile")) {
                pci_hostile_action(v, vn);
        } else if (key_is(k, kn, "pci-cfgwin")) {
                pci_cfgwin_action(v, vn);
        } else if (key_is(k, kn, "pci-blkbench")) {
                pci_blkbench_action(v, vn);
        } else if (key_is(k, kn, "pci-blk-resize")) {
                pci_blk_resize_action(v, vn);
        } else if (key_is(k, kn, "mmioflood")) {
                mmio_flood(v, vn);
        } else if (key_is(k, kn, "cpuid")) {
                cpuid_action(v, vn);
        } else if (key_is(k, kn, "count") && numeric) {
                count_up(n);
        } else if (key_is(k, kn, "exit")) {
                exit_how = v;
                exit_how_len = vn;
        } else if (key_is(k, kn, "boottimer") || key_is(k, kn, "cpus") ||
                   key_is(k, kn, "serialecho") || key_is(k, kn, "blkdev")) {
                bad_value(k, kn, v, vn);
        }
}

static void poweroff(void)
{
        uint8_t value = (uint8_t)(((cfg.slptyp & 7) << SLP_TYP_SHIFT) | SLP_EN);

        if (!cfg.pmport && !cfg.pmmmio) {
                uint64_t rsdp = acpi_find_rsdp();
                struct acpi_sleep_reg r = rsdp ? acpi_fadt_sleep_control(rsdp) : (struct acpi_sleep_reg){0, 0, 0};

                if (r.found && r.is_io)
                        cfg.pmport = r.addr;
                else if (r.found)
                        cfg.pmmmio = r.addr;
        }
        if (cfg.pmport && cfg.pmport <= 0xffff) {
                con_begin("exit poweroff");
                con_kvx("port", cfg.pmport);
                con_kvx("value", value);
                con_end();
                con_line("done");
                outb((uint16_t)cfg.pmport, value);
        } else if (cfg.pmmmio) {
                con_begin("exit poweroff");
                con_kvx("mmio", cfg.pmmmio);
                con_kvx("value", value);
                con_end();
                con_line("done");
                mmio_write8(cfg.pmmmio, value);
        } else {
                con_line("exit poweroff error=no-sleep-control-register");
                con_line("done");
        }
}

/* After a reset or power-off request the VMM should stop us; if it has not
 * within about a second, say so and halt. */
static void __attribute__((noreturn)) exit_failed(const char *how)
{
        uint64_t start = rdtsc();

        while (rdtsc() - start < EXIT_GRACE_TSC)
                cpu_relax();
        con_begin("exit ");
        con_puts(how);
        con_puts(" failed");
        con_end();
        guest_syscall(SYS_HALT);
}

static void __attribute__((noreturn)) do_exit(void)
{
        const char *k = exit_how;
        size_t n = exit_how_len;

        if (key_is(k, n, "reset")) {
                con_line("exit reset");
                con_line("done");
                outb(I8042_COMMAND, I8042_CMD_RESET);
                exit_failed("reset");
        }
        if (key_is(k, n, "poweroff")) {
                poweroff();
                exit_failed("poweroff");
        }
        if (key_is(k, n, "triplefault")) {
                con_line("exit triplefault ring=3");
                con_line("done");
                ring3_triple_fault();
        }
        if (key_is(k, n, "triplefault0")) {
                con_line("exit triplefault ring=0");
                con_line("done");
                guest_syscall(SYS_TRIPLE_FAULT);
        }
        if (!key_is(k, n, "halt")) {
                con_begin("error=bad-value token=exit=");
                con_write(k, n);
                con_end();
        }
        con_line("exit halt");
        con_line("done");
        guest_syscall(SYS_HALT);
}

void guest_main(void)
{
        con_line("hello");
        read_boot_info();
        con_begin("cmdline ");
        con_write(cmdline, cmdline_len);
        con_end();
        for_each_token(apply_setting);
        vdev_configure(&cfg.virtio);
        vsock_configure(&cfg.virtio);
        balloon_configure(&cfg.virtio);
        pci_configure(cfg.pci_ecam, cfg.pci_mmio);
        for_each_token(run_action);
        do_exit();
}
