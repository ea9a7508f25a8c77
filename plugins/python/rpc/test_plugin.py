"""Unit tests of plugin.py, run natively against the helper's stand-in
host: python3 -m unittest (with sdk/python on PYTHONPATH)."""

import unittest

import plugin
import sluice


class AnswerTest(unittest.TestCase):
    def setUp(self):
        sluice.testing.config = {"role": "answer"}

    def tearDown(self):
        sluice.testing.config = {}

    def test_replies_uppercased_to_the_reply_topic(self):
        request = sluice.message("hi", headers={"sluice-reply-to": "sluice-reply.r1"})
        [out] = plugin.rpc(request)
        self.assertEqual(out.topic, "sluice-reply.r1")
        self.assertEqual(out.payload, b"HI")

    def test_rejects_a_message_that_asks_for_no_reply(self):
        with self.assertRaisesRegex(sluice.Reject, "no reply asked for"):
            plugin.rpc(sluice.message("hi"))


class AskTest(unittest.TestCase):
    def setUp(self):
        sluice.testing.config = {"ask": "q", "timeout_ms": "250", "output": "a"}
        self.asked = []

    def tearDown(self):
        sluice.testing.config = {}
        sluice.testing.request = None

    def answer(self, reply):
        def stand_in(out, timeout_ms):
            self.asked.append((out.topic, out.payload, timeout_ms))
            return reply(out)

        sluice.testing.request = stand_in

    def test_publishes_the_reply(self):
        self.answer(lambda out: sluice.message(bytes(out.payload).upper()))
        [out] = plugin.rpc(sluice.message("hi"))
        self.assertEqual(self.asked, [("q", b"hi", 250)])
        self.assertEqual(out.topic, "a")
        self.assertEqual(out.payload, b"HI")
        self.assertEqual([(h.name, h.value) for h in out.headers], [("question", "hi")])

    def test_publishes_why_a_request_failed(self):
        def time_out(out):
            raise sluice.RequestFailed(f"timeout: no reply to `{out.topic}`")

        self.answer(time_out)
        [out] = plugin.rpc(sluice.message("hi"))
        self.assertEqual(out.payload, b"timeout: no reply to `q`")
        self.assertEqual(
            [(h.name, h.value) for h in out.headers],
            [("failed", "true"), ("question", "hi")],
        )

    def test_a_request_without_a_stand_in_fails(self):
        with self.assertRaises(sluice.RequestFailed) as failed:
            sluice.request(sluice.output("q", "hi"))
        self.assertEqual(failed.exception.kind, "failed")
        self.assertIn("sluice.testing.request", str(failed.exception))

    def test_a_timeout_in_the_config_that_is_no_u32_is_1000(self):
        sluice.testing.config["timeout_ms"] = "-1"
        self.answer(lambda out: sluice.message("ok"))
        plugin.rpc(sluice.message("hi"))
        self.assertEqual(self.asked, [("q", b"hi", 1000)])


class RequestFailedTest(unittest.TestCase):
    def test_kind_is_the_first_word_of_the_reason(self):
        failed = sluice.RequestFailed("denied: plugin `rpc` may not send requests to `x`")
        self.assertEqual(failed.kind, "denied")
        self.assertEqual(str(failed), "denied: plugin `rpc` may not send requests to `x`")


if __name__ == "__main__":
    unittest.main()
