"""A counting interrupt line."""


class CountingIrqLine:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
