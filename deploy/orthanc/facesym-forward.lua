-- Orthanc -> FaceSym routing (deploy/compose.yaml; loaded through "LuaScripts" in orthanc.json).
--
-- When a study becomes stable (no new instance for "StableAge" seconds), its photos and videos that
-- FaceSym has not received yet are sent to the "facesym" modality in one asynchronous store job. Only the
-- SOP classes FaceSym accepts are sent (anything else would fail the association), and never FaceSym's
-- own objects coming back (SR and PDF are other classes; key images are Secondary Capture with
-- Manufacturer's Model Name "FaceSym"), so nothing loops. An instance is marked with the user metadata
-- "FaceSymForwarded" once the job succeeded: the mark survives restarts, so a study that changes later
-- (FaceSym's SR arriving, a late video) sends only what is new. A failed job leaves its instances
-- unmarked: they go again the next time the study becomes stable, or by hand (docs/operations.md).

local FACESYM = 'facesym'
local MARK = 'FaceSymForwarded'

local ACCEPTED = {
  ['1.2.840.10008.5.1.4.1.1.77.1.4.1'] = true,  -- Video Photographic Image
  ['1.2.840.10008.5.1.4.1.1.77.1.1.1'] = true,  -- Video Endoscopic Image
  ['1.2.840.10008.5.1.4.1.1.77.1.4'] = true,    -- VL Photographic Image
  ['1.2.840.10008.5.1.4.1.1.7'] = true,         -- Secondary Capture Image
  ['1.2.840.10008.5.1.4.1.1.7.1'] = true,       -- Multi-frame Single Bit SC
  ['1.2.840.10008.5.1.4.1.1.7.2'] = true,       -- Multi-frame Grayscale Byte SC
  ['1.2.840.10008.5.1.4.1.1.7.3'] = true,       -- Multi-frame Grayscale Word SC
  ['1.2.840.10008.5.1.4.1.1.7.4'] = true,       -- Multi-frame True Color SC
}

local pending = {}  -- store job id -> the instance ids it carries

local function trim(s)
  local t = string.gsub(s or '', '^%s+', '')
  t = string.gsub(t, '[%s%z]+$', '')
  return t
end

local function eligible(id)
  for _, name in pairs(ParseJson(RestApiGet('/instances/' .. id .. '/metadata'))) do
    if name == MARK then
      return false
    end
  end
  local sopClass = trim(RestApiGet('/instances/' .. id .. '/metadata/SopClassUid'))
  if not ACCEPTED[sopClass] then
    return false
  end
  local ok, model = pcall(RestApiGet, '/instances/' .. id .. '/content/0008-1090')
  return not (ok and trim(model) == 'FaceSym')
end

function OnStableStudy(studyId, tags, metadata)
  local todo = {}
  for _, instance in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    if eligible(instance['ID']) then
      table.insert(todo, instance['ID'])
    end
  end
  if #todo == 0 then
    return
  end
  local body = DumpJson({ Resources = todo, Asynchronous = true, Permissive = false }, true)
  local job = ParseJson(RestApiPost('/modalities/' .. FACESYM .. '/store', body))
  pending[job['ID']] = todo
  print('FaceSym: forwarding ' .. #todo .. ' instance(s) of study ' .. studyId .. ' in job ' .. job['ID'])
end

function OnJobSuccess(jobId)
  local todo = pending[jobId]
  if todo == nil then
    return
  end
  pending[jobId] = nil
  for _, id in pairs(todo) do
    RestApiPut('/instances/' .. id .. '/metadata/' .. MARK, 'yes')
  end
  print('FaceSym: job ' .. jobId .. ' delivered ' .. #todo .. ' instance(s)')
end

function OnJobFailure(jobId)
  local todo = pending[jobId]
  if todo == nil then
    return
  end
  pending[jobId] = nil
  print('FaceSym: forwarding job ' .. jobId .. ' FAILED; its ' .. #todo .. ' instance(s) stay unmarked '
        .. 'and are sent again when their study next becomes stable')
end
