"""No-op notebook display (lucent's show(); never reached with show_image=False)."""


def display(*objs: object, **kwargs: object) -> None:
    return None


class HTML:
    def __init__(self, data: str = "", *args: object, **kwargs: object) -> None:
        self.data = data


class Image(HTML):
    pass
