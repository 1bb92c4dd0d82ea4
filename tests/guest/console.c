/*
 * COM1 (16550 at 0x3f8), polled from ring 3 through IOPL=3.
 *
 * Transmit: wait for LSR.THRE (bit 5) before every byte, then write THR.
 * Receive (serial_echo): wait for LSR.DR (bit 0), then read RBR.
 * No UART setup is done: an emulated 16550 transmits and receives with its
 * reset defaults, and a real divisor does not matter to a VMM.
 *
 * Every report line starts with "testguest: " and is built with con_begin /
 * con_kv / con_end so that tests can split it into key=value fields.
 */
#include "guest.h"

#define COM1            0x3f8
#define UART_RBR        0       /* receive buffer (read) */
#define UART_THR        0       /* transmit holding (write) */
#define UART_LSR        5
#define UART_LSR_DR     0x01
#define UART_LSR_THRE   0x20

void con_putc(char c)
{
        while (!(inb(COM1 + UART_LSR) & UART_LSR_THRE))
                cpu_relax();
        outb(COM1 + UART_THR, (uint8_t)c);
}

void con_write(const char *s, size_t n)
{
        while (n--)
                con_putc(*s++);
}

void con_puts(const char *s)
{
        con_write(s, strlen(s));
}

void con_hex(uint64_t v)
{
        char buf[18];
        int i = sizeof(buf);

        do {
                buf[--i] = "0123456789abcdef"[v & 15];
                v >>= 4;
        } while (v);
        buf[--i] = 'x';
        buf[--i] = '0';
        con_write(buf + i, sizeof(buf) - (size_t)i);
}

void con_hex32(uint32_t v)
{
        con_puts("0x");
        for (int shift = 28; shift >= 0; shift -= 4)
                con_putc("0123456789abcdef"[(v >> shift) & 15]);
}

void con_dec(uint64_t v)
{
        char buf[20];
        int i = sizeof(buf);

        do {
                buf[--i] = (char)('0' + v % 10);
                v /= 10;
        } while (v);
        con_write(buf + i, sizeof(buf) - (size_t)i);
}

void con_bytes_hex(const volatile uint8_t *p, size_t n)
{
        while (n--) {
                uint8_t b = *p++;

                con_putc("0123456789abcdef"[b >> 4]);
                con_putc("0123456789abcdef"[b & 15]);
        }
}

void con_begin(const char *s)
{
        con_puts("testguest: ");
        con_puts(s);
}

void con_end(void)
{
        con_putc('\n');
}

void con_line(const char *s)
{
        con_begin(s);
        con_end();
}

void con_kv(const char *key, uint64_t v)
{
        con_putc(' ');
        con_puts(key);
        con_putc('=');
        con_dec(v);
}

void con_kvx(const char *key, uint64_t v)
{
        con_putc(' ');
        con_puts(key);
        con_putc('=');
        con_hex(v);
}

/* Echo one line of input back as "echo:<line>\n".  Each LSR poll is a VM
 * exit, so back off a little between polls instead of hammering the VMM. */
void serial_echo(void)
{
        int started = 0;

        con_line("serialecho ready");
        for (;;) {
                uint8_t c;

                while (!(inb(COM1 + UART_LSR) & UART_LSR_DR))
                        for (int i = 0; i < 256; i++)
                                cpu_relax();
                c = inb(COM1 + UART_RBR);
                if (!started) {
                        con_puts("echo:");
                        started = 1;
                }
                if (c == '\n' || c == '\r') {
                        con_putc('\n');
                        return;
                }
                con_putc((char)c);
        }
}
