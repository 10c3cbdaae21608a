"""Task options are validated when a task is declared; send options when they are given."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import msgspec
import pytest

from offload import App, ConfigurationError, EncodeError, Task
from offload.task import SendOptions


@pytest.fixture
def app() -> App:
    return App("memory://unit-tasks")  # never connected: declaring tasks needs no broker


def test_unknown_option_fails_at_decoration_naming_it(app: App) -> None:
    with pytest.raises(ConfigurationError, match="retires") as caught:

        @app.task(retires=3)  # type: ignore[call-overload]
        def typo() -> None:
            pass

    assert "retries" in str(caught.value)  # the known options are listed


@pytest.mark.parametrize("priority", [-1, 10, 2.5, "high", None])
def test_bad_priority_fails_at_decoration(app: App, priority: Any) -> None:
    with pytest.raises(ConfigurationError, match="priority"):

        @app.task(priority=priority)
        def task() -> None:
            pass


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "30", [1]])
def test_bad_timeout_fails_at_decoration(app: App, timeout: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):

        @app.task(timeout=timeout)
        def task() -> None:
            pass


@pytest.mark.parametrize("queue", ["", "has space", "slash/es", "x" * 101, "naïve", 7])
def test_bad_queue_name_fails_at_decoration(app: App, queue: Any) -> None:
    with pytest.raises(ConfigurationError, match="queue name"):

        @app.task(queue=queue)
        def task() -> None:
            pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"retries": -1}, "retries"),
        ({"result_ttl": 0}, "result_ttl"),
        ({"result_ttl": "1d"}, "result_ttl"),
        ({"retries": "3"}, "retries"),
        ({"backoff": -1}, "backoff"),
        ({"backoff_max": 0}, "backoff_max"),
        ({"retry_deadline": 0}, "retry_deadline"),
        ({"retry_on": ("ValueError",)}, "retry_on"),
        ({"dont_retry_on": [KeyError, 3]}, "dont_retry_on"),
        ({"executor": "gpu"}, "executor"),
        ({"executor": "async"}, "async def"),
    ],
)
def test_other_bad_options_fail_at_decoration(app: App, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):

        @app.task(**options)
        def task() -> None:
            pass


def test_retry_rules_accept_a_tuple_or_a_single_exception_class(app: App) -> None:
    @app.task(retry_on=(ConnectionError, TimeoutError), dont_retry_on=KeyError)
    def task() -> None:
        pass

    assert task.config.retry.retry_on == (ConnectionError, TimeoutError)
    assert task.config.retry.dont_retry_on == (KeyError,)


def test_process_executor_needs_a_plain_function(app: App) -> None:
    with pytest.raises(ConfigurationError, match="plain functions"):

        @app.task(executor="process")
        async def task() -> None:
            pass


def test_a_failed_declaration_registers_nothing(app: App) -> None:
    with pytest.raises(ConfigurationError):

        @app.task(name="broken", priority=99)
        def task() -> None:
            pass

    assert "broken" not in app.tasks


def test_defaults_and_derived_options(app: App) -> None:
    @app.task
    def plain(n: int) -> int:
        return n

    @app.task(retries=5, queue="emails", priority=3, timeout=None)
    async def coroutine() -> None:
        pass

    assert isinstance(plain, Task)
    assert plain.name == f"{__name__}.test_defaults_and_derived_options.<locals>.plain"
    assert (plain.config.executor, plain.config.queue, plain.config.timeout) == ("thread", "default", 300.0)
    assert plain.config.max_deliveries == 3 + 3  # retries + 3: crashes do not eat the retries
    assert coroutine.config.executor == "async"
    assert coroutine.config.max_deliveries == 5 + 3
    assert (coroutine.config.queue, coroutine.config.priority, coroutine.config.timeout) == (
        "emails",
        3,
        None,
    )
    assert plain(4) == 4  # calling the task runs the function here
    assert app.get_task(plain.name) is plain


def test_two_functions_under_one_name_are_refused(app: App) -> None:
    @app.task(name="dup")
    def first() -> None:
        pass

    with pytest.raises(ConfigurationError, match="dup"):

        @app.task(name="dup")
        def second() -> None:
            pass


def test_unknown_task_lookup_lists_known_tasks(app: App) -> None:
    @app.task(name="known")
    def known() -> None:
        pass

    with pytest.raises(LookupError, match="known"):
        app.get_task("unknown")


def test_app_validates_queue_bounds_and_urls() -> None:
    app = App("memory://unit-bounds")
    app.queue("bounded", max_depth=10)
    assert app.queue_bounds == {"bounded": 10}
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigurationError, match="max_depth"):
            app.queue("q", max_depth=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="queue name"):
        app.queue("bad name")
    with pytest.raises(ConfigurationError, match="unknown broker URL"):
        App("mysql://localhost/db")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://host/offload.db", "has a host"),
        ("sqlite://", "names no file"),
        ("sqlite:///:memory:", "names no file"),
        ("sqlite:///offload.db?durability=yolo", "durability"),
        ("sqlite:///offload.db?journal=off", "unknown SQLite URL option"),
    ],
)
def test_bad_sqlite_urls_are_refused_before_anything_is_written(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        App(url)


# -- send options ----------------------------------------------------------------------------------


def test_message_carries_task_config_and_send_overrides(app: App) -> None:
    @app.task(queue="images", priority=2, timeout=30, retries=1, result_ttl=60)
    def resize(image_id: int, width: int = 100) -> str:
        return ""

    m = resize.message(42, width=640)
    assert (m.task, m.queue, m.args, m.kwargs) == (resize.name, "images", (42,), {"width": 640})
    assert (m.priority, m.timeout, m.max_deliveries, m.result_ttl, m.eta) == (2, 30, 4, 60, None)

    before = time.time()
    o = resize.options(queue="urgent", priority=9, delay=10, timeout=5, idempotency_key="k").message(1)
    assert (o.queue, o.priority, o.timeout, o.idempotency_key) == ("urgent", 9, 5, "k")
    assert o.eta is not None and before + 10 <= o.eta <= time.time() + 10
    assert resize.message(1).queue == "images", "options() changed the task itself"


def test_options_chain_and_delay_replaces_eta(app: App) -> None:
    @app.task
    def job() -> None:
        pass

    chained = job.options(priority=5).options(queue="q2")
    m = chained.message()
    assert (m.priority, m.queue) == (5, "q2")
    m = job.options(eta=1e12).options(delay=1).message()
    assert m.eta is not None and m.eta < 1e12


def test_eta_accepts_aware_datetimes_only(app: App) -> None:
    @app.task
    def job() -> None:
        pass

    when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert job.options(eta=when).message().eta == when.timestamp()
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        job.options(eta=dt.datetime(2030, 1, 1)).message()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": 1, "eta": 5.0}, "not both"),
        ({"delay": -1}, "delay"),
        ({"delay": "5"}, "delay"),
        ({"eta": "tomorrow"}, "eta"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"priority": 11}, "priority"),
        ({"queue": "no spaces"}, "queue name"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"idempotency_window": -1}, "idempotency_window"),
    ],
)
def test_bad_send_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SendOptions(**options)


def test_bad_send_options_fail_at_options_not_at_send(app: App) -> None:
    @app.task
    def job() -> None:
        pass

    with pytest.raises(ConfigurationError, match="timeout"):
        job.options(timeout=-1)
    with pytest.raises(ConfigurationError, match="idempotency_window"):
        job.options(idempotency_key="k", idempotency_window=-3)


def test_arguments_are_checked_against_the_signature_at_send(app: App) -> None:
    @app.task
    def job(a: int, *, b: str = "") -> None:
        pass

    job.message(1, b="x")
    with pytest.raises(EncodeError, match="cannot take these arguments"):
        job.message(1, 2)  # type: ignore[call-arg]
    with pytest.raises(EncodeError, match="cannot take these arguments"):
        job.message(c=1)  # type: ignore[call-arg]


def test_positional_arguments_to_a_plain_signature_are_checked_like_any_others(app: App) -> None:
    @app.task
    def job(a: int, b: int, c: int = 0) -> None:
        pass

    job.message(1, 2)
    job.message(1, 2, 3)
    job.message(1, b=2)
    for args in [(1,), (1, 2, 3, 4), ()]:
        with pytest.raises(EncodeError, match="cannot take these arguments"):
            job.message(*args)  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="cannot take these arguments"):
        job.message(1, 2, a=1)  # type: ignore[misc]


class Size(msgspec.Struct):
    width: int
    height: int


def test_decoded_arguments_are_converted_back_to_their_annotated_types(app: App) -> None:
    @app.task
    def job(when: dt.datetime, size: Size, n: int, anything: Any = None) -> None:
        pass

    args, kwargs = job.convert_arguments(
        ["2024-01-02T03:04:05Z", {"width": 1, "height": 2}, 3], {"anything": {"x": 1}}
    )
    assert job.signature.bind(*args, **kwargs).arguments == {
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "size": Size(1, 2),
        "n": 3,
        "anything": {"x": 1},  # Any: passed through as decoded
    }
    with pytest.raises(msgspec.ValidationError):
        job.convert_arguments(["not a date", {"width": 1, "height": 2}, 3], {})
