"""ps_server.gflags_utils against docs/semantics.md §10 (Monolith's gflags_utils, its test cases).

absl keeps one process-wide ``flags.FLAGS``. The ``fv`` fixture swaps it for an empty
``FlagValues`` for the length of a test (gflags_utils reads ``flags.FLAGS`` when called), so
tests neither see nor leave flags behind. absl's ``DEFINE_*`` bind their default
``flag_values`` at import, so tests always pass ``flag_values=fv`` explicitly.
"""

import dataclasses
import logging
from enum import Enum
from typing import Optional

import pytest
from absl import flags

from ps_server import gflags_utils as utils

# --- The dataclasses of Monolith's test (renamed so pytest does not collect them) ------


@dataclasses.dataclass
class SampleConfig:
    """
    :param test_int1: integer 1 for test
    :param test_int2: integer 2 for test
    :param test_str: string for test
                        and test another line
    """

    test_int1: int = 0
    test_int2: int = 0
    test_str: str = None  # type: ignore[assignment]  # Monolith's own test uses a None str


@dataclasses.dataclass
class SampleConfig4(SampleConfig):
    """
    :param testconfig4_int1: testconfig4_int1
    :param testconfig4_str1: testconfig4_str1
    """

    testconfig4_int1: int = 4
    testconfig4_str1: str = "testconfig4_str1"


@dataclasses.dataclass
class SampleConfig5Base:
    """
    :param testconfig5base_int1: testconfig5base_int1
    :param testconfig5base_str: testconfig5base_str
    """

    testconfig5base_int1: int = 0
    testconfig5base_str: str = "base"


class Color(Enum):
    RED = 1
    Green = 2
    CRIMSON = 1  # an alias of RED: not a separate choice


@pytest.fixture
def fv(monkeypatch: pytest.MonkeyPatch) -> flags.FlagValues:
    """An empty FlagValues standing in for absl's global FLAGS during one test."""
    fresh = flags.FlagValues()
    monkeypatch.setattr(flags, "FLAGS", fresh)
    return fresh


def _doc(text: str) -> type:
    """A plain class (no dataclass auto-docstring) whose docstring is ``text``."""
    return type("Doc", (), {"__doc__": text})


# --- extract_help_info ----------------------------------------------------------------------


def test_help_info_joins_wrapped_lines() -> None:
    # Nested reading also visits `object`, whose docstring has no :param line: adds nothing.
    assert utils.extract_help_info(SampleConfig) == {
        "test_int1": "integer 1 for test",
        "test_int2": "integer 2 for test",
        "test_str": "string for test and test another line",
    }


def test_help_info_nested_reads_bases_first() -> None:
    nested = utils.extract_help_info(SampleConfig4)
    assert nested == {
        "test_int1": "integer 1 for test",
        "test_int2": "integer 2 for test",
        "test_str": "string for test and test another line",
        "testconfig4_int1": "testconfig4_int1",
        "testconfig4_str1": "testconfig4_str1",
    }
    assert utils.extract_help_info(SampleConfig4, is_nested=False) == {
        "testconfig4_int1": "testconfig4_int1",
        "testconfig4_str1": "testconfig4_str1",
    }


def test_help_info_subclass_entry_overwrites_base() -> None:
    base = _doc(":param a: from base\n:param b: only base")
    sub = type("Sub", (base,), {"__doc__": ":param a: from sub"})
    assert utils.extract_help_info(sub) == {"a": "from sub", "b": "only base"}
    assert utils.extract_help_info(sub, is_nested=False) == {"a": "from sub"}


def test_help_info_folds_whitespace_and_ignores_preamble() -> None:
    cls = _doc(
        "Summary line, ignored.\n"
        "   More preamble :param not_at_start: ignored too\n"
        "\n"
        "\t:param   spaced  :   x    y\t\tz   \n"
        "      wrapped\t  line \n"
        "   \n"
        ":param empty:\n"
        "  continued\n"
    )
    # "x    y\t\tz" folds to "x y z"; the wrapped line joins with one space.
    # ":param empty:" opens "" and its continuation joins as "" + " " + "continued".
    assert utils.extract_help_info(cls, is_nested=False) == {
        "spaced": "x y z wrapped line",
        "empty": " continued",
    }


def test_help_info_return_line_goes_to_last_param() -> None:
    cls = _doc(":param a: first\n:param b: second\n:return: nothing at all")
    assert utils.extract_help_info(cls, is_nested=False) == {
        "a": "first",
        "b": "second :return: nothing at all",
    }


def test_help_info_param_names_may_hold_dots_dashes() -> None:
    cls = _doc(":param a.b-c_9: ok\n:param bad name: no")
    # "bad name" stops the name at "bad", then needs ':' — not a :param line, so it
    # continues the a.b-c_9 entry.
    assert utils.extract_help_info(cls, is_nested=False) == {"a.b-c_9": "ok :param bad name: no"}


def test_help_info_consecutive_duplicate_param_asserts() -> None:
    with pytest.raises(AssertionError):
        utils.extract_help_info(_doc(":param a: one\n:param a: two"), is_nested=False)
    # Continuation lines in between do not separate the two.
    with pytest.raises(AssertionError):
        utils.extract_help_info(_doc(":param a: one\nmore\n:param a: two"), is_nested=False)


def test_help_info_non_consecutive_repeat_overwrites() -> None:
    cls = _doc(":param a: one\n  wrapped\n:param b: two\n:param a: three")
    assert utils.extract_help_info(cls, is_nested=False) == {"a": "three", "b": "two"}


def test_help_info_blank_or_missing_docstring_asserts() -> None:
    with pytest.raises(AssertionError):
        utils.extract_help_info(_doc("  \n\t\n   "), is_nested=False)
    with pytest.raises(AssertionError):
        utils.extract_help_info(_doc(""), is_nested=False)

    class NoDoc:
        pass

    assert NoDoc.__doc__ is None
    with pytest.raises(AssertionError):
        utils.extract_help_info(NoDoc, is_nested=False)


def test_help_info_blank_base_docstring_asserts_only_when_nested() -> None:
    base = _doc("   ")
    sub = type("Sub", (base,), {"__doc__": ":param a: x"})
    with pytest.raises(AssertionError):
        utils.extract_help_info(sub)
    assert utils.extract_help_info(sub, is_nested=False) == {"a": "x"}


def test_help_info_undocumented_dataclass_is_empty() -> None:
    @dataclasses.dataclass
    class Plain:
        x: int = 1

    # dataclass writes "Plain(x: int = 1)" as docstring: no :param lines.
    assert Plain.__doc__ is not None
    assert utils.extract_help_info(Plain) == {}


# --- extract_flags --------------------------------------------------------------------------


@dataclasses.dataclass
class Kinds:
    """
    :param k_int: an int
    :param k_bool: a bool
    :param k_str: a str
    :param k_float: a float
    :param k_color: a color
    :param k_list: a list
    :param k_opt: an optional
    """

    k_int: int = 7
    k_bool: bool = True
    k_str: str = "abc"
    k_float: float = 0.25
    k_color: Color = Color.Green
    k_list: list[str] = dataclasses.field(default_factory=list)
    k_opt: Optional[int] = None  # noqa: UP045 - typing.Optional is the case under test


def test_extract_flags_kinds_defaults_and_help(
    fv: flags.FlagValues, monkeypatch: pytest.MonkeyPatch
) -> None:
    # k_list has help but no class attribute (default_factory): Monolith's getattr raises.
    with pytest.raises(AttributeError):
        utils.extract_flags(flags, Kinds)
    # Fields before it were defined already.
    assert sorted(fv) == ["k_bool", "k_color", "k_float", "k_int", "k_str"]

    fresh = flags.FlagValues()
    monkeypatch.setattr(flags, "FLAGS", fresh)
    returned = utils.extract_flags(flags, Kinds, skip_flags={"k_list"})
    assert returned is fresh
    # k_opt (Optional[int]) has no flag kind: silently left out.
    assert sorted(fresh) == ["k_bool", "k_color", "k_float", "k_int", "k_str"]

    expected = {
        "k_int": ("int", 7, "int, default=7, an int"),
        "k_bool": ("bool", True, "bool, default=True, a bool"),
        "k_str": ("string", "abc", "string, default=abc, a str"),
        "k_float": ("float", 0.25, "float, default=0.25, a float"),
        # absl prefixes the choices to an enum flag's help; str(Color.Green) is "Color.Green".
        "k_color": ("string enum", "green", "<red|green>: enum, default=Color.Green, a color"),
    }
    for name, (kind, default, help_text) in expected.items():
        flag = fresh[name]
        assert flag.flag_type() == kind, name
        assert flag.default == default, name
        assert flag.help == help_text, name
    assert fresh["k_color"].parser.enum_values == ["red", "green"]  # type: ignore[attr-defined]


def test_extract_flags_none_default_and_wrapped_help(fv: flags.FlagValues) -> None:
    utils.extract_flags(flags, SampleConfig)
    assert fv["test_str"].default is None
    assert fv["test_str"].help == "string, default=None, string for test and test another line"
    assert fv["test_int1"].help == "int, default=0, integer 1 for test"


def test_extract_flags_skips_missing_help_and_skip_flags(fv: flags.FlagValues) -> None:
    @dataclasses.dataclass
    class Partial:
        """
        :param documented: has help
        :param skipped: has help but is skipped
        """

        documented: int = 1
        skipped: int = 2
        undocumented: int = 3

    utils.extract_flags(flags, Partial, skip_flags=["skipped"])
    assert list(fv) == ["documented"]


def test_extract_flags_ignores_already_defined_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("test_int1", 99, "defined first", flag_values=fv)
    utils.extract_flags(flags, SampleConfig)  # DuplicateFlagError inside: swallowed
    assert fv["test_int1"].default == 99
    assert fv["test_int1"].help == "defined first"
    assert fv["test_int2"].default == 0  # the others are still defined


def test_extract_flags_not_nested_leaves_base_fields(fv: flags.FlagValues) -> None:
    @dataclasses.dataclass
    class Sub(SampleConfig5Base):
        """
        :param testconfig5_int1: testconfig5_int1
        """

        testconfig5_int1: int = 5

    utils.extract_flags(flags, Sub, is_nested=False)
    assert list(fv) == ["testconfig5_int1"]
    utils.extract_flags(flags, Sub)  # nested: base fields get flags too
    assert sorted(fv) == ["testconfig5_int1", "testconfig5base_int1", "testconfig5base_str"]


def test_extract_flags_decorator(fv: flags.FlagValues) -> None:
    @utils.extract_flags_decorator()
    @dataclasses.dataclass
    class TestConfig2:
        """
        :param testconfig2_int1: integer 1 for TestConfig2
        :param testconfig2_str1: str 1 for TestConfig2
        """

        testconfig2_int1: int = 1
        testconfig2_str1: str = "str1"

    fv.mark_as_parsed()
    conf = TestConfig2(testconfig2_int1=2, testconfig2_str1="newstr1")
    assert fv.testconfig2_int1 == 1
    assert fv.testconfig2_str1 == "str1"
    assert (conf.testconfig2_int1, conf.testconfig2_str1) == (2, "newstr1")


def test_extract_flags_decorator_remove_flags_and_not_nested(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("testconfig3_int1", "elsewhere", "defined by someone else", flag_values=fv)

    @utils.extract_flags_decorator({"testconfig3_int1", "testconfig3_str1"})
    @dataclasses.dataclass
    class TestConfig3:
        """
        :param testconfig3_int1: testconfig3_int1
        :param testconfig3_int2: testconfig3_int2
        :param testconfig3_str1: testconfig3_str1
        """

        testconfig3_int1: int = 1
        testconfig3_int2: int = 2
        testconfig3_str1: str = "str1"

    decorated = TestConfig3
    assert dataclasses.is_dataclass(decorated)  # returned unchanged
    assert sorted(fv) == ["testconfig3_int1", "testconfig3_int2"]
    assert fv["testconfig3_int1"].default == "elsewhere"  # the other owner's flag is kept

    @utils.extract_flags_decorator(is_nested=False)
    @dataclasses.dataclass
    class TestConfig5(SampleConfig5Base):
        """
        :param testconfig5_int1: testconfig5_int1
        """

        testconfig5_int1: int = 5

    assert "testconfig5_int1" in fv
    assert "testconfig5base_int1" not in fv
    conf5 = TestConfig5()
    assert (conf5.testconfig5base_int1, conf5.testconfig5_int1) == (0, 5)


# --- get_flags_parser -----------------------------------------------------------------------


def test_flags_parser_returns_leftover_arguments(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("p_int", 1, "an int", flag_values=fv)
    parse = utils.get_flags_parser(flags, fv)
    assert parse(["prog", "--p_int=5", "positional"]) == ["prog", "positional"]
    assert fv.p_int == 5


@pytest.mark.parametrize("bad", ["--no_such_flag=1", "--p_int=notanint"])
def test_flags_parser_exits_on_bad_flag(
    fv: flags.FlagValues, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    flags.DEFINE_integer("p_int", 1, "the p_int help", flag_values=fv)
    parse = utils.get_flags_parser(flags, fv)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        parse(["prog", bad])
    assert exited.value.code == 1
    assert "the p_int help" in caplog.text  # the flags' help is logged with the error


# --- update ---------------------------------------------------------------------------------


def test_update_monolith_case(fv: flags.FlagValues) -> None:
    # Flag defaults differ from the dataclass defaults (0); nothing on the command line.
    flags.DEFINE_integer("test_int1", 2, "test int 1", flag_values=fv)
    flags.DEFINE_integer("test_int2", 3, "test int 2", flag_values=fv)
    fv(["prog"])
    config = SampleConfig(test_int1=1, test_int2=0)
    assert utils.update(config) is config
    assert config.test_int1 == 1  # set in code (1 != default 0): kept
    assert config.test_int2 == 3  # still the default 0, flag says 3 != 0: taken
    assert config.test_str is None  # no flag of that name


def test_update_from_command_line(fv: flags.FlagValues) -> None:
    utils.extract_flags(flags, SampleConfig)  # flag defaults = dataclass defaults
    fv(["prog", "--test_int1=5", "--test_str=hello"])
    config = utils.update(SampleConfig())
    assert (config.test_int1, config.test_int2, config.test_str) == (5, 0, "hello")
    # A value given in code wins over the command line.
    assert utils.update(SampleConfig(test_int1=4)).test_int1 == 4


def test_update_flag_set_back_to_dataclass_default_changes_nothing(
    fv: flags.FlagValues,
) -> None:
    flags.DEFINE_integer("test_int1", 2, "flag default 2", flag_values=fv)
    fv(["prog", "--test_int1=0"])  # from_cmd 0 == dataclass default 0
    assert utils.update(SampleConfig()).test_int1 == 0

    @dataclasses.dataclass
    class Ratio:
        ratio: float = 0  # an int default

    flags.DEFINE_float("ratio", 0.0, "r", flag_values=fv)
    fv(["prog"])
    # 0.0 == 0, so the field is not written: it keeps the int 0 rather than the float 0.0.
    assert type(utils.update(Ratio()).ratio) is int


def test_update_unparsed_flags_are_ignored(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("test_int2", 3, "test int 2", flag_values=fv)
    assert not fv.is_parsed()
    assert utils.update(SampleConfig()).test_int2 == 0


def test_update_enum_field(fv: flags.FlagValues) -> None:
    @dataclasses.dataclass
    class Painted:
        """:param paint: which color"""

        paint: Color = Color.RED

    utils.extract_flags(flags, Painted)
    fv(["prog", "--paint=green"])
    # "green".upper() == "GREEN" is not a member name (the member is "Green").
    with pytest.raises(KeyError):
        utils.update(Painted())

    fv(["prog", "--paint=red"])  # "RED": the default member, so nothing to change
    assert utils.update(Painted()).paint is Color.RED

    class Level(Enum):
        LOW = 1
        HIGH = 2

    @dataclasses.dataclass
    class Leveled:
        """:param level: how much"""

        level: Level = Level.LOW

    utils.extract_flags(flags, Leveled)
    fv(["prog", "--level=high"])
    assert utils.update(Leveled()).level is Level.HIGH


def test_update_frozen_factory_optional_and_required_fields(fv: flags.FlagValues) -> None:
    @dataclasses.dataclass(frozen=True)
    class Mixed:
        required: int
        tags: list[str] = dataclasses.field(default_factory=list)
        maybe: Optional[int] = None  # noqa: UP045 - typing.Optional is the case under test

    flags.DEFINE_integer("required", 8, "r", flag_values=fv)
    flags.DEFINE_list("tags", ["a", "b"], "t", flag_values=fv)
    flags.DEFINE_integer("maybe", 6, "m", flag_values=fv)
    fv(["prog"])
    config = utils.update(Mixed(required=1))
    assert config.required == 1  # no default to compare with: left alone
    assert config.tags == ["a", "b"]  # default_factory() == [] and the flag differs
    assert config.maybe == 6


# --- LinkDataclassToFlags / update_by_flags -------------------------------------------------


def test_link_list_and_map(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("lk_a", 1, "a", flag_values=fv)
    flags.DEFINE_string("lk_other", "x", "other", flag_values=fv)
    flags.DEFINE_integer("lk_unset", 10, "unset", flag_values=fv)

    @utils.update_by_flags
    @utils.LinkDataclassToFlags(
        linked_list=["lk_a"], linked_map={"name": "lk_other", "u": "lk_unset"}
    )
    @dataclasses.dataclass
    class Linked:
        lk_a: int = 1
        name: str = "x"
        u: int = 1
        plain: int = 0

    assert Linked._monolith_gflag_meta == {  # type: ignore[attr-defined]
        "name": "lk_other",
        "u": "lk_unset",
        "lk_a": "lk_a",
    }
    assert Linked.__init__.__name__ == "__init__"

    # Before parsing every flag holds its own default: nothing applies.
    assert Linked() == Linked(1, "x", 1, 0)

    fv(["prog", "--lk_a=5", "--lk_other=y"])
    got = Linked()
    assert (got.lk_a, got.name, got.plain) == (5, "y", 0)
    # lk_unset keeps its flag default 10: "value != flag default" is false, so u stays 1
    # even though 10 differs from the dataclass default (unlike update()).
    assert got.u == 1
    # Fields given away from their default are kept; positional arguments still work.
    assert Linked(7, name="z") == Linked(7, "z", 1, 0)


def test_link_list_entry_wins_over_map_entry(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("shared", 0, "s", flag_values=fv)
    flags.DEFINE_integer("shared_alt", 0, "a", flag_values=fv)

    @utils.LinkDataclassToFlags(linked_list=["shared"], linked_map={"shared": "shared_alt"})
    @dataclasses.dataclass
    class Both:
        shared: int = 0

    # The map is read first, then the list: the list's "shared -> shared" replaces it.
    assert Both._monolith_gflag_meta == {"shared": "shared"}  # type: ignore[attr-defined]


def test_link_errors(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("le_flag", 1, "f", flag_values=fv)

    class NotDataclass:
        le_flag: int = 1

    with pytest.raises(AssertionError):
        utils.LinkDataclassToFlags(linked_list=["le_flag"])(NotDataclass)

    @dataclasses.dataclass
    class Target:
        le_flag: int = 1

    with pytest.raises(ValueError) as bad_field:
        utils.LinkDataclassToFlags(linked_map={"nope": "le_flag"})(Target)
    assert str(bad_field.value) == f"nope is not a valid attribute of {Target}"

    with pytest.raises(ValueError) as bad_flag:
        utils.LinkDataclassToFlags(linked_map={"le_flag": "le_missing"})(Target)
    assert str(bad_flag.value) == "le_missing is not defined in gflags"

    # The checks run before anything is stored.
    assert not hasattr(Target, "_monolith_gflag_meta")

    with pytest.raises(AssertionError):
        utils.update_by_flags(NotDataclass)


def test_update_by_flags_on_subclass_honours_base_links(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("inh_base", 0, "b", flag_values=fv)
    flags.DEFINE_integer("inh_sub", 0, "s", flag_values=fv)

    @utils.update_by_flags
    @utils.LinkDataclassToFlags(linked_map={"base_field": "inh_base"})
    @dataclasses.dataclass(frozen=True)
    class Base:
        base_field: int = 1

    base_links = Base._monolith_gflag_meta  # type: ignore[attr-defined]

    @utils.update_by_flags
    @utils.LinkDataclassToFlags(linked_map={"sub_field": "inh_sub"})
    @dataclasses.dataclass(frozen=True)
    class Sub(Base):
        sub_field: int = 2

    # Monolith quirk: Sub inherits the attribute, so its links land in Base's dict.
    assert Sub._monolith_gflag_meta is base_links  # type: ignore[attr-defined]
    assert base_links == {"base_field": "inh_base", "sub_field": "inh_sub"}

    fv(["prog", "--inh_base=11", "--inh_sub=22"])
    sub = Sub()
    assert (sub.base_field, sub.sub_field) == (11, 22)
    # Base's own __init__ took its links when decorated, before Sub added one.
    assert Base().base_field == 11

    @utils.update_by_flags
    @dataclasses.dataclass(frozen=True)
    class Undecorated(Base):  # no links of its own
        extra: int = 3

    # Undecorated inherits Base's dict, which now also names Sub's sub_field; a field
    # Undecorated does not have is skipped rather than failing its construction.
    assert Undecorated._monolith_gflag_meta is base_links  # type: ignore[attr-defined]
    assert (Undecorated().base_field, Undecorated().extra) == (11, 3)


def test_update_by_flags_later_mro_class_wins(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("mro_a", 0, "a", flag_values=fv)
    flags.DEFINE_integer("mro_b", 0, "b", flag_values=fv)

    @utils.LinkDataclassToFlags(linked_map={"v": "mro_a"})
    @dataclasses.dataclass
    class A:
        v: int = 1

    @utils.LinkDataclassToFlags(linked_map={"v": "mro_b"})
    @dataclasses.dataclass
    class B:
        v: int = 1

    @utils.update_by_flags
    @dataclasses.dataclass
    class C(A, B):
        pass

    fv(["prog", "--mro_a=100", "--mro_b=200"])
    # MRO is C, A, B: B's link for v comes last and wins.
    assert C().v == 200
