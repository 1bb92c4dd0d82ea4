from asyncvmm.devices.legacy.boot_timer import BootTimer


def test_magic_write_reports_wall_and_cpu_time():
    lines = []
    t = BootTimer(1_000_000, 500_000, clock=lambda: 1_000_000 + 123_456_000,
                  cpu_clock=lambda: 500_000 + 7_000_000, report=lines.append)
    t.write(0, bytes([7]))
    assert lines == []
    t.write(0, bytes([123]))
    assert lines == ["Guest-boot-time = 123456 us 123 ms,   7000 CPU us 7 CPU ms"]
    assert t.boot_time_us == 123456
    assert t.read(0, 4) == bytes(4)
