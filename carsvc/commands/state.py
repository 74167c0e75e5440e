"""`carsvc state get|set|keys`: a state scope (by default a run's thread id)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from carsvc.commands.base import EXIT_CALL_FAILED, UsageError, emit, value_text


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    state = commands.add_parser("state", help="read and write shared state")
    verbs = state.add_subparsers(dest="verb", required=True, metavar="{get,set,keys}")

    get = verbs.add_parser(
        "get", parents=[common], help="a key's value, as JSON", description="Print a key's value as JSON "
        "(exit 1 when the key is not set)."
    )
    get.add_argument("scope", metavar="SCOPE", help="the state scope (a run's state_scope; by default its thread)")
    get.add_argument("key", metavar="KEY")
    get.set_defaults(operator=get_key)

    put = verbs.add_parser("set", parents=[common], help="write a key")
    put.add_argument("scope", metavar="SCOPE")
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE", help="JSON (42, true, '\"text\"', '{\"a\": 1}'); see --string")
    put.add_argument("--string", action="store_true", help="take VALUE as a string, not JSON")
    put.add_argument("--writer", default="carsvc-cli", help="recorded with the write (default carsvc-cli)")
    put.set_defaults(operator=set_key)

    keys = verbs.add_parser("keys", parents=[common], help="a scope's keys, sorted")
    keys.add_argument("scope", metavar="SCOPE")
    keys.add_argument("--prefix", default="", help="only keys starting with this")
    keys.set_defaults(operator=list_keys)


async def get_key(client: Any, args: argparse.Namespace) -> int:
    from carsvc._proto.car.v1 import state_pb2
    from carsvc.values import from_value

    response = await client.state.Get(state_pb2.GetRequest(scope=args.scope, key=args.key))
    value = from_value(response.value) if response.found else None
    if args.json:
        emit(
            {"scope": args.scope, "key": args.key, "found": response.found, "value": value, "writer": response.writer}
        )
    elif response.found:
        print(value_text(value))
    if not response.found:
        print(f"carsvc: key {args.key!r} is not set in scope {args.scope!r}", file=sys.stderr)
        return EXIT_CALL_FAILED
    return 0


async def set_key(client: Any, args: argparse.Namespace) -> int:
    value: Any = args.value
    if not args.string:
        try:
            value = json.loads(args.value)
        except json.JSONDecodeError as err:
            raise UsageError(f"VALUE is not JSON ({err.msg}); pass --string to store it as text") from None
    index = await client.set_state(args.scope, args.key, value, writer=args.writer)
    if args.json:
        emit({"scope": args.scope, "key": args.key, "index": index})
    else:
        print(f"set {args.key} in {args.scope} (transition {index})")
    return 0


async def list_keys(client: Any, args: argparse.Namespace) -> int:
    from carsvc._proto.car.v1 import state_pb2

    token = ""
    count = 0
    while True:
        page = await client.state.ListKeys(
            state_pb2.ListKeysRequest(scope=args.scope, prefix=args.prefix, page_token=token)
        )
        for key in page.keys:
            if args.json:
                emit({"scope": args.scope, "key": key})
            else:
                print(key)
        count += len(page.keys)
        token = page.next_page_token
        if not token:
            break
    if not count and not args.json:
        print(f"(no keys in {args.scope})", file=sys.stderr)
    return 0
