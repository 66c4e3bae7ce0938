"""The words the bot says, in English and Chinese, and how it picks the language.

Every user-facing sentence lives here, so wording is reviewed in one place and both
languages stay in step (a test checks that each key has both).
"""

from __future__ import annotations

import re
from typing import Final, Literal

from engine import images

Language = Literal["en", "zh"]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def language_of(code: str | None, text: str | None = None) -> Language:
    """Chinese when the text is written in Chinese or the platform's language code is
    Chinese (zh, zh-hans, zh-TW...), English otherwise."""
    if text and _CJK.search(text):
        return "zh"
    if text and re.search(r"[A-Za-z]{3,}", text):
        return "en"
    return "zh" if code and code.lower().startswith("zh") else "en"


MESSAGES: Final[dict[str, dict[Language, str]]] = {
    "default_question": {"en": "What dish is this?", "zh": "这是什么菜？"},
    "start": {
        "en": (
            "Hi! I'm dishbot. Send me a photo of a dish and I'll tell you what it is — "
            'add a question as the caption if you like ("is this spicy?").\n\n'
            "Rate my answers with 👍 / 👎, and tap ✏️ to tell me what it really was: "
            "that is how I learn. /help shows everything I can do."
        ),
        "zh": (
            "你好！我是 dishbot。发一张菜的照片给我，我来告诉你这是什么菜——"
            "也可以在图片说明里提问（比如“辣不辣？”）。\n\n"
            "用 👍 / 👎 给我的回答打分，点 ✏️ 告诉我正确答案：我就是这样学习的。"
            "/help 查看全部功能。"
        ),
    },
    "help": {
        "en": (
            "How to use dishbot:\n"
            "• Send a photo of a dish; the caption is your question "
            '(default: "What dish is this?").\n'
            "• Reply to one of my answers to ask a follow-up about the same photo.\n"
            "• 👍 / 👎 rate an answer; ✏️ corrects it.\n"
            "• In groups, mention me in the caption or reply to me.\n\n"
            "Commands:\n"
            "/help — this message\n"
            "/cancel — drop your questions still waiting\n"
            "/forget — delete everything I stored about you"
        ),
        "zh": (
            "使用方法：\n"
            "• 发送一张菜的照片，图片说明就是你的问题（默认：“这是什么菜？”）。\n"
            "• 回复我的某条回答，可以就同一张照片继续追问。\n"
            "• 👍 / 👎 给回答打分；✏️ 纠正回答。\n"
            "• 在群里，请在图片说明里 @ 我，或回复我的消息。\n\n"
            "命令：\n"
            "/help — 显示本帮助\n"
            "/cancel — 取消你还在排队的问题\n"
            "/forget — 删除我保存的关于你的所有数据"
        ),
    },
    "queued": {"en": "⏳ {ahead} ahead of you…", "zh": "⏳ 前面还有 {ahead} 个问题…"},
    "empty_answer": {
        "en": "(I have no answer to that — try asking differently.)",
        "zh": "（这个问题我答不上来，换个问法试试。）",
    },
    "rated_up": {"en": "Thanks for the 👍!", "zh": "谢谢你的 👍！"},
    "rated_down": {"en": "Thanks, noted 👎.", "zh": "收到你的 👎，谢谢。"},
    "ask_correction": {
        "en": "✏️ What is it actually? Reply to this message with the dish's name.",
        "zh": "✏️ 那它到底是什么菜？请回复这条消息，告诉我菜名。",
    },
    "ask_correction_title": {"en": "What is it actually?", "zh": "那它到底是什么菜？"},
    "correction_field": {"en": "The dish's name", "zh": "菜名"},
    "correction_thanks": {
        "en": "Thanks! I've noted that it is: {text}",
        "zh": "谢谢！已记下：{text}",
    },
    "answer_gone": {
        "en": "That answer is no longer stored.",
        "zh": "这条回答已经不在记录里了。",
    },
    "no_photo_hint": {
        "en": "Send me a photo of a dish (or reply to one of my answers) and I'll answer.",
        "zh": "发一张菜的照片给我（或者回复我的某条回答），我就来回答。",
    },
    "not_a_photo": {
        "en": "I can't use that file: {reason}. Please send a JPEG, PNG, WebP or HEIC photo.",
        "zh": "这个文件我用不了：{reason}。请发送 JPEG、PNG、WebP 或 HEIC 格式的照片。",
    },
    "bad_image": {
        "en": "I can't use that image: {reason}.",
        "zh": "这张图片我用不了：{reason}。",
    },
    "photo_too_large": {
        "en": "That photo is larger than {megabytes} MB; please send a smaller one.",
        "zh": "这张照片超过 {megabytes} MB，请发送小一点的。",
    },
    "download_failed": {
        "en": "Sorry, I couldn't download that photo. Please send it again.",
        "zh": "抱歉，照片没能下载下来，请再发一次。",
    },
    "slow_down": {
        "en": "You're asking faster than I can eat 🍜 — please wait a minute and try again.",
        "zh": "你问得太快啦 🍜 ——请等一分钟再试。",
    },
    "too_many_pending": {
        "en": "You already have questions waiting — let me answer those first, then ask again.",
        "zh": "你还有问题在排队——等我先回答完，再来问吧。",
    },
    "busy": {
        "en": "I'm very busy right now — please try again in a minute.",
        "zh": "我现在太忙了——请过一分钟再试。",
    },
    "timed_out": {
        "en": "Sorry, that took too long and I gave up. Please try again.",
        "zh": "抱歉，处理时间太长，我放弃了。请再试一次。",
    },
    "restart_lost_answer": {
        "en": (
            "Sorry — I restarted while answering your photo and lost the answer; "
            "please send it again."
        ),
        "zh": "抱歉——我在回答你的照片时重启了，答案丢失了，请再发一次。",
    },
    "store_unavailable": {
        "en": (
            "I can't take questions right now (my database is unreachable); "
            "please try again in a minute."
        ),
        "zh": "我现在无法接收问题（我的数据库暂时连不上），请过一分钟再试。",
    },
    "engine_failed": {
        "en": "Sorry, something went wrong while I was looking at that. Please try again.",
        "zh": "抱歉，我在看这张照片时出了点问题。请再试一次。",
    },
    "unavailable": {
        "en": "Sorry, I'm not able to answer right now. Please try again later.",
        "zh": "抱歉，我现在无法回答。请稍后再试。",
    },
    "model_not_ready": {
        "en": "I'm still getting ready (fetching and loading the model) — please ask again in "
        "a few minutes.",
        "zh": "我还在准备中（正在下载并加载模型）——请过几分钟再问。",
    },
    "model_unavailable": {
        "en": "Sorry, the model is unavailable right now — please try again in a few minutes.",
        "zh": "抱歉，模型暂时不可用——请过几分钟再试。",
    },
    "prompt_too_long": {
        "en": "That is more than I can read at once: please ask a shorter question.",
        "zh": "内容太多，我一次读不完：请把问题问得短一些。",
    },
    "turns_left_out": {
        "en": "(I left out the {count} oldest turns of this conversation to fit what I can "
        "read at once.)",
        "zh": "（为了一次读得完，我略去了这段对话最早的 {count} 轮。）",
    },
    "turn_left_out": {
        "en": "(I left out the oldest turn of this conversation to fit what I can read at once.)",
        "zh": "（为了一次读得完，我略去了这段对话最早的一轮。）",
    },
    "cancelled": {"en": "Cancelled.", "zh": "已取消。"},
    "cancel_done": {
        "en": "Dropped {count} waiting question(s).",
        "zh": "已取消 {count} 个排队中的问题。",
    },
    "cancel_none": {"en": "You have no questions waiting.", "zh": "你没有排队中的问题。"},
    "forget_confirm": {
        "en": (
            "This deletes everything I stored about you: your photos, questions, answers, "
            "ratings and corrections. It cannot be undone. Delete it all?"
        ),
        "zh": (
            "这会删除我保存的关于你的所有数据：照片、问题、回答、评分和纠正，且无法恢复。"
            "确定全部删除吗？"
        ),
    },
    "forget_yes": {"en": "🗑 Delete everything", "zh": "🗑 全部删除"},
    "forget_no": {"en": "Keep it", "zh": "保留"},
    "forget_done": {
        "en": "Done: I deleted {exchanges} question(s), {ratings} rating(s), "
        "{corrections} correction(s) and {photos} photo(s).",
        "zh": (
            "完成：已删除 {exchanges} 个问题、{ratings} 个评分、"
            "{corrections} 个纠正和 {photos} 张照片。"
        ),
    },
    "forget_nothing": {
        "en": "I had nothing stored about you.",
        "zh": "我没有保存关于你的任何数据。",
    },
    "forget_kept": {"en": "OK, nothing was deleted.", "zh": "好的，没有删除任何数据。"},
    "not_your_button": {
        "en": "That button is for someone else.",
        "zh": "这个按钮不是给你的。",
    },
    "unknown_button": {"en": "That button no longer works.", "zh": "这个按钮已经失效了。"},
    "unknown_command": {
        "en": "I don't know that command. /help lists the ones I do.",
        "zh": "我不认识这个命令。/help 可以查看所有命令。",
    },
    "admin_only": {"en": "That command is for admins.", "zh": "这个命令只有管理员可以用。"},
    "retrain_unavailable": {
        "en": "Retraining is not set up in this process.",
        "zh": "这个进程没有启用重新训练。",
    },
    "retrain_nothing_running": {
        "en": "No retraining is running.",
        "zh": "现在没有在进行的训练。",
    },
    "retrain_cancelling": {"en": "Cancelling run {id} …", "zh": "正在取消训练 #{id} …"},
    "retrain_usage": {
        "en": "/retrain starts a run; /retrain force promotes it whatever the evaluation says; "
        "/retrain cancel stops the one running.",
        "zh": "/retrain 开始训练；/retrain force 无论评估结果都上线；"
        "/retrain cancel 停止当前训练。",
    },
    "retrain_busy": {
        "en": "A retraining run is already going; one at a time:",
        "zh": "已经有一个训练在进行中，一次只能进行一个：",
    },
    "retrain_failed_to_start": {
        "en": "Retraining could not start: {reason}",
        "zh": "无法开始训练：{reason}",
    },
    "rollback_done": {
        "en": "Rolled back: {name} is answering again.",
        "zh": "已回滚：现在由 {name} 回答。",
    },
    "rollback_nothing": {
        "en": "There is no earlier version to roll back to.",
        "zh": "没有可以回滚到的更早版本。",
    },
    "admin_in_private": {
        "en": "Admin commands are answered in a private chat with me, not in a group.",
        "zh": "管理命令请在与我的私聊中使用，不要在群组里用。",
    },
    "forget_people_only": {
        "en": (
            "/forget deletes one person's data, and this message was sent on behalf of a chat. "
            "Send /forget from your own account to delete yours."
        ),
        "zh": "/forget 删除的是某个人的数据，而这条消息是以群组或频道身份发送的。"
        "请用你自己的账号发送 /forget 来删除你的数据。",
    },
    "question_too_long": {
        "en": "That question is too long for me: please keep it to {limit} characters or fewer.",
        "zh": "这个问题太长了：请控制在 {limit} 个字符以内。",
    },
    "correction_empty": {
        "en": "I didn't catch a dish name there: please write what it actually is.",
        "zh": "没有看到菜名：请写下它到底是什么菜。",
    },
    "export_running": {
        "en": "An export is already running.",
        "zh": "已经有一个导出在进行中。",
    },
    "export_started": {"en": "Exporting to {path} …", "zh": "正在导出到 {path} …"},
    "export_failed": {"en": "Export failed: {reason}", "zh": "导出失败：{reason}"},
    # The web console's chat page.
    "web_title": {"en": "dishbot — what dish is this?", "zh": "dishbot —— 这是什么菜？"},
    "web_intro": {
        "en": "Drop, paste or choose a photo of a dish, ask about it in any language, and "
        "rate the answer: 👍 / 👎, or ✏️ to say what it really is.",
        "zh": "拖入、粘贴或选择一张菜的照片，用任何语言提问，然后给回答打分："
        "👍 / 👎，或者点 ✏️ 告诉我它到底是什么菜。",
    },
    "web_choose_photo": {"en": "📷 Photo", "zh": "📷 照片"},
    "web_question_placeholder": {
        "en": "Ask about the photo, or a follow-up…",
        "zh": "问问这张照片，或者接着追问…",
    },
    "web_send": {"en": "Ask", "zh": "提问"},
    "web_drop_here": {"en": "Drop the photo here", "zh": "把照片拖到这里"},
    "web_you": {"en": "You", "zh": "你"},
    "web_photo_sent": {"en": "📷 photo", "zh": "📷 照片"},
    "web_correction_send": {"en": "Send correction", "zh": "提交更正"},
    "web_session_expired": {
        "en": "This page has expired: reload it and try again.",
        "zh": "这个页面已过期：请刷新后再试。",
    },
    "web_bad_form": {
        "en": "That request was not understood: reload the page and try again.",
        "zh": "无法理解这个请求：请刷新页面后再试。",
    },
    "web_connection_lost": {
        "en": "Connection lost — reconnecting…",
        "zh": "连接已断开——正在重新连接…",
    },
    # The web console's admin pages.
    "admin_web_title": {"en": "dishbot admin", "zh": "dishbot 管理"},
    "admin_web_login": {"en": "Log in", "zh": "登录"},
    "admin_web_password": {"en": "Admin password", "zh": "管理密码"},
    "admin_web_token_confirm": {
        "en": "Log in to the dishbot admin console in this browser with the one-time link?",
        "zh": "要用这个一次性链接在此浏览器中登录 dishbot 管理后台吗？",
    },
    "admin_web_token_hint": {
        "en": "Open the newest one-time login link that dishbot printed in its log "
        "(or set web.admin_password).",
        "zh": "请打开 dishbot 在日志里打印的最新的一次性登录链接（或者设置 web.admin_password）。",
    },
    "admin_web_login_failed": {
        "en": "That did not work: wrong password, or a login link already used.",
        "zh": "登录失败：密码错误，或者登录链接已经用过了。",
    },
    "admin_web_login_too_many": {
        "en": "Too many login attempts: wait a minute and try again.",
        "zh": "登录尝试太多：请等一分钟再试。",
    },
    "admin_web_login_needed": {
        "en": "Admins only: log in first.",
        "zh": "仅限管理员：请先登录。",
    },
    "admin_web_logout": {"en": "Log out", "zh": "退出登录"},
    "admin_web_overview": {"en": "Overview", "zh": "概览"},
    "admin_web_training": {"en": "Training", "zh": "训练"},
    "admin_web_models": {"en": "Models", "zh": "模型"},
    "admin_web_queue": {"en": "The queue now", "zh": "当前队列"},
    "admin_web_model": {"en": "Model", "zh": "模型"},
    "admin_web_waiting": {"en": "Waiting", "zh": "等待中"},
    "admin_web_answering": {"en": "Answering", "zh": "回答中"},
    "admin_web_capacity": {"en": "Capacity", "zh": "容量"},
    "admin_web_start_run": {"en": "Start a run", "zh": "开始训练"},
    "admin_web_force": {
        "en": "promote the new model whatever the evaluation says",
        "zh": "无论评估结果如何都上线新模型",
    },
    "admin_web_cancel_run": {"en": "Cancel the run", "zh": "取消训练"},
    "admin_web_run_model_not_ready": {
        "en": "The model is not answering yet (see the chat page): a run can start once it is.",
        "zh": "模型还不能回答（见聊天页面）：等它能回答了再开始训练。",
    },
    "admin_web_run_busy": {
        "en": "A run is already going: one at a time.",
        "zh": "已经有一个训练在进行中：一次只能进行一个。",
    },
    "admin_web_run_not_started": {
        "en": "The run could not start: the log says why.",
        "zh": "训练无法开始：原因见日志。",
    },
    "admin_web_current_run": {"en": "Latest run", "zh": "最近一次训练"},
    "admin_web_no_runs": {"en": "No runs yet.", "zh": "还没有训练过。"},
    "admin_web_past_runs": {"en": "Past runs", "zh": "历史训练"},
    "admin_web_stage": {"en": "Stage", "zh": "阶段"},
    "admin_web_loss": {"en": "Loss", "zh": "损失"},
    "admin_web_eta": {"en": "Time left", "zh": "剩余时间"},
    "admin_web_log": {"en": "Log", "zh": "日志"},
    "admin_web_started": {"en": "Started", "zh": "开始时间"},
    "admin_web_took": {"en": "Took", "zh": "用时"},
    "admin_web_trainer": {"en": "Trainer", "zh": "训练器"},
    "admin_web_outcome": {"en": "Outcome", "zh": "结果"},
    "admin_web_versions": {"en": "Model versions", "zh": "模型版本"},
    "admin_web_active": {"en": "active", "zh": "当前"},
    "admin_web_activate": {"en": "Activate", "zh": "启用"},
    "admin_web_rollback": {"en": "Roll back", "zh": "回滚"},
    "admin_web_no_such_version": {"en": "There is no such version.", "zh": "没有这个版本。"},
    "admin_web_set": {"en": "Set", "zh": "数据集"},
    "admin_web_count": {"en": "Questions", "zh": "题数"},
    "admin_web_active_model": {"en": "Active model", "zh": "当前模型"},
    "admin_web_candidate": {"en": "Candidate", "zh": "候选模型"},
    "admin_web_question": {"en": "Question", "zh": "问题"},
    "admin_web_expected": {"en": "Expected", "zh": "期望答案"},
    "admin_web_photo": {"en": "Photo", "zh": "照片"},
    "admin_web_no_evaluation": {"en": "Not evaluated.", "zh": "没有评估结果。"},
    "admin_web_review": {"en": "Review", "zh": "审核"},
    "admin_web_dataset": {"en": "Dataset", "zh": "数据集"},
    "admin_web_dataset_now": {
        "en": "An export made now would contain",
        "zh": "现在导出的话会包含",
    },
    "admin_web_samples": {"en": "Samples", "zh": "样本"},
    "admin_web_train": {"en": "Train", "zh": "训练集"},
    "admin_web_val": {"en": "Validation", "zh": "验证集"},
    "admin_web_photos": {"en": "Photos", "zh": "照片"},
    "admin_web_by_reason": {"en": "Answers by what became of them", "zh": "回答的去向"},
    "admin_web_top_dishes": {"en": "Most frequent dishes", "zh": "最常见的菜"},
    "admin_web_sample_records": {"en": "A sample of the records", "zh": "部分样本"},
    "admin_web_export": {"en": "Export", "zh": "导出"},
    "admin_web_exported": {
        "en": "Exported to the exports directory as {name}.",
        "zh": "已导出到导出目录：{name}。",
    },
    "admin_web_chart_questions": {"en": "Questions per day", "zh": "每天的提问"},
    "admin_web_chart_latency": {
        "en": "Answer latency per day (seconds)",
        "zh": "每天的回答耗时（秒）",
    },
    "admin_web_chart_ratings": {"en": "👍 rate per model version", "zh": "各模型版本的 👍 比例"},
    "admin_web_answered": {"en": "answered", "zh": "已回答"},
    "admin_web_failed": {"en": "failed", "zh": "失败"},
    "admin_web_nothing_to_review": {
        "en": "No corrections are waiting for review.",
        "zh": "没有等待审核的更正。",
    },
    "admin_web_answer": {"en": "The model's answer", "zh": "模型的回答"},
    "admin_web_correction": {"en": "Correction", "zh": "更正"},
    "admin_web_user": {"en": "By", "zh": "提交者"},
    "admin_web_trusted": {"en": "trusted", "zh": "可信"},
    "admin_web_banned": {"en": "banned", "zh": "已封禁"},
    "admin_web_trust": {"en": "Trust", "zh": "设为可信"},
    "admin_web_untrust": {"en": "Stop trusting", "zh": "取消可信"},
    "admin_web_ban": {"en": "Ban", "zh": "封禁"},
    "admin_web_unban": {"en": "Lift the ban", "zh": "解除封禁"},
    "admin_web_fix_placeholder": {
        "en": "fix the text (optional)",
        "zh": "修改文字（可选）",
    },
    "admin_web_accept": {"en": "Accept", "zh": "接受"},
    "admin_web_reject": {"en": "Reject all", "zh": "全部拒绝"},
}

# The engine's reasons for refusing an image, for Chinese speakers. Reasons with figures in
# them (size limits) stay in English inside the Chinese sentence.
_IMAGE_REASONS_ZH: Final[dict[str, str]] = {
    "the file is empty": "文件是空的",
    images.NOT_AN_ACCEPTED_IMAGE: "它不是 JPEG、PNG、WebP 或 HEIC 图片",
    images.CORRUPT_IMAGE: "图片数据不完整或已损坏",
    images.HEIC_NOT_SUPPORTED: "这里不支持 HEIC 照片，请用 JPEG 格式发送",
    images.TOO_MANY_SCANS: "这张 JPEG 的渐进扫描次数太多，无法安全解码",
    images.TOO_MANY_PARTS: "文件由太多部分组成，无法安全解码",
    images.TOO_SLOW_TO_DECODE: "图片解码耗时太长",
    images.TOO_MUCH_METADATA: "图片附带的元数据超出允许范围",
}


def say(key: str, language: Language, **values: object) -> str:
    """The sentence ``key`` in ``language``, with ``values`` filled in."""
    return MESSAGES[key][language].format(**values)


def image_reason(reason: str, language: Language) -> str:
    """An image refusal reason from the engine, in the user's language where known."""
    if language == "zh":
        return _IMAGE_REASONS_ZH.get(reason, reason)
    return reason
