/*
 * cpuid=LEAF[.SUBLEAF]: execute CPUID and print the four registers, twice:
 * from ring 3 (`cpuid ring=3 ...`) and from ring 0 (`cpuid ring=0 ...`,
 * through the SYS_CPUID gate in entry.S).
 *
 * Under VMX or SVM, CPUID exits to the hypervisor in every ring, which answers
 * from the vCPU's table (KVM_SET_CPUID2): both lines show what a CPU template
 * set.  Under kvm_pvm on a CPU without CPUID faulting (this AMD host), ring 3
 * runs CPUID natively and sees the host CPU; only ring 0, which PVM emulates,
 * reads the vCPU's table.  Tests compare the ring=0 line with the template.
 */
#include "guest.h"

static void cpuid_ring3(uint32_t leaf, uint32_t subleaf, uint32_t r[4])
{
        __asm__ __volatile__("cpuid"
                             : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                             : "a"(leaf), "c"(subleaf));
}

static void cpuid_ring0(uint32_t leaf, uint32_t subleaf, uint32_t r[4])
{
        __asm__ __volatile__("ud2"
                             : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                             : "a"(SYS_CPUID), "S"(leaf), "c"(subleaf)
                             : "memory");
}

static void report(int ring, uint32_t leaf, uint32_t subleaf, const uint32_t r[4])
{
        con_begin(ring ? "cpuid ring=3" : "cpuid ring=0");
        con_kvx("leaf", leaf);
        con_kvx("subleaf", subleaf);
        con_kvx("eax", r[0]);
        con_kvx("ebx", r[1]);
        con_kvx("ecx", r[2]);
        con_kvx("edx", r[3]);
        con_end();
}

/* LEAF and SUBLEAF as parse_u64 reads them (0x.. or decimal), separated by '.'. */
void cpuid_action(const char *v, size_t vn)
{
        uint64_t leaf, subleaf = 0;
        size_t dot = 0;
        uint32_t r[4];

        while (dot < vn && v[dot] != '.')
                dot++;
        if (parse_u64(v, dot, &leaf) < 0 || leaf > 0xffffffffu ||
            (dot < vn && (parse_u64(v + dot + 1, vn - dot - 1, &subleaf) < 0 ||
                          subleaf > 0xffffffffu))) {
                con_begin("error=bad-value token=cpuid=");
                con_write(v, vn);
                con_end();
                return;
        }
        cpuid_ring3((uint32_t)leaf, (uint32_t)subleaf, r);
        report(3, (uint32_t)leaf, (uint32_t)subleaf, r);
        cpuid_ring0((uint32_t)leaf, (uint32_t)subleaf, r);
        report(0, (uint32_t)leaf, (uint32_t)subleaf, r);
}
