"""The spec's custom filter rule: `read_only_where(con, expression, table)` -> a SELECT DuckDB wrote itself.

`filter.where` is user text spliced into SQL, so it is accepted only as one read-only boolean
expression over the columns of the judged table, checked with DuckDB's own parser:

1. it is parsed as the WHERE clause of `SELECT rid FROM <table> WHERE (<expression>)`, and the parse
   tree (`json_serialize_sql`) must be exactly that query: one SELECT, no CTE, set operation, ORDER BY,
   LIMIT, GROUP BY, HAVING, QUALIFY, sample or second statement (anything smuggled past a closing
   parenthesis or a comment changes the tree and is refused);
2. the expression tree may not hold a subquery, a prepared-statement parameter, a window, or a function
   outside DuckDB's scalar functions and macros, and none of the side-effecting or environment-reading
   ones (`DENIED`);
3. it must bind against the table and have the type BOOLEAN;
4. what runs is DuckDB's re-rendering of the checked tree (`json_deserialize_sql`), never the text, on a
   connection whose external access is already off (no file, network or extension access).
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

MAX_LENGTH = 2000
DENIED = {"getenv", "current_setting", "getvariable", "setseed", "nextval", "currval", "random", "uuid",
          "gen_random_uuid", "uuidv4", "uuidv7", "txid_current", "current_query", "sleep_ms", "error",
          "make_timestamp_ns_now", "now", "current_timestamp", "get_current_timestamp", "today", "current_date",
          "current_time", "transaction_timestamp", "version", "pragma_version", "current_database", "current_schema",
          "current_schemas", "current_catalog", "current_user", "session_user", "user", "pg_backend_pid"}
DENIED_PREFIXES = ("read_", "sql_", "json_serialize", "json_deserialize", "duckdb_", "pragma_", "pg_", "has_")
DENIED_CLASSES = {"SUBQUERY", "PARAMETER", "WINDOW", "DEFAULT", "STAR", "POSITIONAL_REFERENCE"}


class WhereError(ValueError):
    """A filter.where that is not one read-only boolean expression; the message says why and what to write."""


def _tree(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    return json.loads(con.execute("SELECT json_serialize_sql($q)", {"q": sql}).fetchall()[0][0])


def _strip_locations(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_locations(v) for k, v in node.items() if not k.startswith("query_location")}
    if isinstance(node, list):
        return [_strip_locations(v) for v in node]
    return node


def _walk(node: Any, allowed: set[str], refuse) -> None:  # noqa: ANN001
    if isinstance(node, list):
        for child in node:
            _walk(child, allowed, refuse)
        return
    if not isinstance(node, dict):
        return
    kind, cls = str(node.get("type", "")), str(node.get("class", ""))
    if cls in DENIED_CLASSES or "SUBQUERY" in kind or kind.endswith("_NODE"):
        refuse(f"it holds a {cls or kind.lower()} (subqueries, parameters and windows are not allowed)")
    if cls == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if node.get("schema") or node.get("catalog"):
            refuse(f"function {name} is schema-qualified")
        if name in DENIED or name.startswith(DENIED_PREFIXES) or (name not in allowed and not node.get("is_operator")):
            refuse(f"function {name}() is not an allowed read-only scalar function")
    for value in node.values():
        _walk(value, allowed, refuse)


def read_only_where(con: duckdb.DuckDBPyConnection, expression: str, table: str, columns: list[str]) -> str:
    """Validate `expression`; return `SELECT rid FROM <table> WHERE ...` as DuckDB renders the checked tree."""
    def refuse(why: str) -> None:
        raise WhereError(f"filter.where {str(expression)[:200]!r} is refused: {why}. Write one boolean expression "
                         f"over the columns {', '.join(columns)}, e.g. \"width >= 512 AND caption NOT LIKE "
                         "'%logo%'\"")

    if not isinstance(expression, str) or not expression.strip():
        refuse("it is empty")
    if len(expression) > MAX_LENGTH:
        refuse(f"it is longer than {MAX_LENGTH} characters")
    if "\x00" in expression:
        refuse("it contains a NUL character")
    query = f"SELECT rid FROM {table} WHERE ({expression})"
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        refuse(f"it does not parse: {str(err).splitlines()[0]}")
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        refuse("it is more than one expression (a ';' or a statement)")
    tree = _tree(con, query)
    if tree.get("error"):
        refuse(f"it does not parse: {tree.get('error_message')}")
    reference = _tree(con, f"SELECT rid FROM {table} WHERE (TRUE)")
    got, want = _strip_locations(tree["statements"]), _strip_locations(reference["statements"])
    if len(got) != 1 or {**got[0]["node"], "where_clause": None} != {**want[0]["node"], "where_clause": None}:
        refuse("it changes the query around it (a set operation, ORDER BY, LIMIT, GROUP BY, a CTE or a comment)")
    allowed = {row[0].lower() for row in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type IN ('scalar', 'macro')").fetchall()}
    _walk(tree["statements"][0]["node"]["where_clause"], allowed, refuse)
    rendered = con.execute("SELECT json_deserialize_sql($t)", {"t": json.dumps(tree)}).fetchall()[0][0]
    as_value = json.loads(json.dumps(tree))  # the same checked expression as the one column of a SELECT
    node = as_value["statements"][0]["node"]
    node["select_list"], node["where_clause"] = [node["where_clause"]], None
    value_query = con.execute("SELECT json_deserialize_sql($t)", {"t": json.dumps(as_value)}).fetchall()[0][0]
    try:
        kind = con.execute(f"DESCRIBE {value_query}").fetchall()[0][1]
    except duckdb.Error as err:
        refuse(f"it does not bind: {str(err).splitlines()[0]}")
    if kind != "BOOLEAN":
        refuse(f"it is of type {kind}, not BOOLEAN")
    return rendered
